"""Training samples (`rerank.training.samples`): train prefixes only, negatives, determinism, caps."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.data.dataset import SplitDataset
from pipeline.errors import PipelineError
from rerank.training.samples import build_samples, samples_from_config
from tests.helpers.data import N_TRAIN_ITEMS, make_ds


def test_every_train_prefix_and_nothing_from_val_or_test():
    ds = make_ds()
    samples = build_samples(ds, n_candidates=5, seed=0, history_len=3)
    # Paper: every prefix with >= 1 earlier item, of the TRAIN sequence only.
    assert len(samples) == sum(len(ds.train_sequence(u)) - 1 for u in range(ds.n_users))
    assert [(s.user, s.position) for s in samples] == [
        (u, t) for u in range(ds.n_users) for t in range(1, len(ds.train_sequence(u)))
    ]
    held_out = {i for s in ds.sequences for i in s[-2:]}
    for s in samples:
        seq = ds.train_sequence(s.user)
        assert s.target == seq[s.position]
        assert s.history == tuple(seq[max(0, s.position - 3) : s.position])  # last history_len kept
        assert s.target not in held_out and not held_out & set(s.history)


def test_candidates_are_target_plus_distinct_negatives_outside_history():
    ds = make_ds()
    samples = build_samples(ds, n_candidates=6, seed=1, history_len=2)
    for s in samples:
        seen = set(ds.train_sequence(s.user)[: s.position])  # the full history so far, not just the kept part
        negs = [c for i, c in enumerate(s.candidates) if i != s.target_index]
        assert len(s.candidates) == 6 and len(set(s.candidates)) == 6
        assert not seen & set(negs) and s.target not in negs
        assert all(1 <= c <= ds.n_items for c in negs)
    assert len({s.target_index for s in samples}) > 3  # shuffled: the target is not always first


def test_deterministic_for_a_seed():
    ds = make_ds()
    assert build_samples(ds, n_candidates=5, seed=3) == build_samples(ds, n_candidates=5, seed=3)
    assert build_samples(ds, n_candidates=5, seed=3) != build_samples(ds, n_candidates=5, seed=4)


def test_caps_keep_the_same_samples():
    ds = make_ds()
    full = {(s.user, s.position): s for s in build_samples(ds, n_candidates=5, seed=0)}
    last2 = build_samples(ds, n_candidates=5, seed=0, max_prefixes_per_user=2)
    assert [(s.user, s.position) for s in last2] == [
        (u, t) for u in range(ds.n_users) for t in (len(ds.train_sequence(u)) - 2, len(ds.train_sequence(u)) - 1)
    ]
    capped = build_samples(ds, n_candidates=5, seed=0, max_samples=7)
    assert len(capped) == 7 and len({(s.user, s.position) for s in capped}) == 7
    # A sample depends only on (seed, user, position): capping does not change it.
    assert all(full[(s.user, s.position)] == s for s in [*last2, *capped])
    assert capped == build_samples(ds, n_candidates=5, seed=0, max_samples=7)
    assert capped != build_samples(ds, n_candidates=5, seed=1, max_samples=7)


def test_min_history():
    ds = make_ds()
    samples = build_samples(ds, n_candidates=5, seed=0, min_history=4)
    assert min(s.position for s in samples) == 4 and min(len(s.history) for s in samples) == 4
    with pytest.raises(PipelineError, match="train_min_history"):
        build_samples(ds, n_candidates=5, min_history=99)


def _train_rows(ds: SplitDataset, extra: dict[int, list[int]]) -> list[dict]:
    """candidates_train.jsonl-style rows: target = last train item, candidates given per user."""
    rows = []
    for u in range(ds.n_users):
        train = ds.train_sequence(u)
        cands = extra[u]
        rows.append(
            {
                "user": ds.user_ids[u],
                "history": [ds.item_ids[i] for i in train[:-1]],
                "candidates": [ds.item_ids[i] for i in cands],
                "scores": [0.0] * len(cands),
                "target": ds.item_ids[train[-1]],
            }
        )
    return rows


def test_retriever_negatives_come_from_the_train_candidates_first():
    ds = make_ds()
    # Each user's retriever list: its own history items and target (must be skipped) mixed with
    # 3 outside items (hard negatives, in retriever order).
    hard = {u: [100 - u, ds.train_sequence(u)[0], 95 - u, ds.train_sequence(u)[-1], 90 - u] for u in range(ds.n_users)}
    hard = {u: [i if i <= ds.n_items else (i % N_TRAIN_ITEMS) + 1 for i in items] for u, items in hard.items()}
    rows = _train_rows(ds, hard)
    samples = build_samples(ds, n_candidates=6, negatives="retriever", seed=0, retriever_rows=rows)
    for s in samples:
        seen = set(ds.train_sequence(s.user)[: s.position + 1])
        negs = [c for i, c in enumerate(s.candidates) if i != s.target_index]
        want_hard = [i for i in dict.fromkeys(hard[s.user]) if i not in seen][:5]
        assert set(want_hard) <= set(negs)  # every usable hard negative is used ...
        assert len(negs) == 5 and not seen & set(negs)  # ... and random ones top up to K-1
    # With K-1 <= the usable hard negatives, all negatives come from the retriever row.
    few = build_samples(ds, n_candidates=2, negatives="retriever", seed=0, retriever_rows=rows)
    for s in few:
        seen = set(ds.train_sequence(s.user)[: s.position + 1])
        negs = [c for i, c in enumerate(s.candidates) if i != s.target_index]
        assert negs == [i for i in hard[s.user] if i not in seen][:1]


def test_retriever_rows_must_be_this_datasets_train_split():
    ds = make_ds()
    rows = _train_rows(ds, {u: [1, 2, 3] for u in range(ds.n_users)})
    rows[2]["target"] = ds.item_ids[ds.sequences[2][-2]]  # a val-split row
    with pytest.raises(PipelineError, match="last train item"):
        build_samples(ds, n_candidates=3, negatives="retriever", retriever_rows=rows)
    with pytest.raises(PipelineError, match="candidates_train"):
        build_samples(ds, n_candidates=3, negatives="retriever")


def test_too_few_items_for_the_negatives():
    ds = make_ds()
    with pytest.raises(PipelineError, match="train_candidates"):
        build_samples(ds, n_candidates=ds.n_items + 5)


def test_samples_from_config():
    ds = make_ds()
    cfg = SimpleNamespace(
        train_candidates=4, train_negatives="random", max_history=2, train_min_history=2,
        train_max_prefixes_per_user=3, max_train_samples=None, train_covered_only=False,
    )
    got = samples_from_config(ds, cfg, seed=5)
    assert got == build_samples(ds, n_candidates=4, seed=5, history_len=2, min_history=2, max_prefixes_per_user=3)
    assert all(len(s.candidates) == 4 and len(s.history) == 2 for s in got)


# --- per-prefix retriever negatives (candidates_train_prefixes.jsonl) and the random/retriever mix


def _prefix_rows(ds: SplitDataset, lists, positions=None) -> list[dict]:
    """candidates_train_prefixes.jsonl-style rows: lists(u, t) -> dense candidate ids of prefix t."""
    rows = []
    for u in range(ds.n_users):
        train = ds.train_sequence(u)
        ts = list(range(1, len(train))) if positions is None else positions(u)
        rows.append({
            "user": ds.user_ids[u],
            "positions": ts,
            "targets": [ds.item_ids[train[t]] for t in ts],
            "candidates": [[ds.item_ids[i] for i in lists(u, t)] for t in ts],
        })
    return rows


def _own_list(ds: SplitDataset, u: int, t: int) -> list[int]:
    """A distinct retriever list per prefix: the history so far and the target (skipped), then
    items that shift with t (hard negatives, retriever order)."""
    train = ds.train_sequence(u)
    outside = [(u * 5 + t * 3 + k) % N_TRAIN_ITEMS + 1 for k in range(12)]
    return list(dict.fromkeys([train[0], *outside[:2], train[t], *outside[2:]]))


def _negatives(s) -> list[int]:
    return [c for i, c in enumerate(s.candidates) if i != s.target_index]


def test_retriever_negatives_come_from_the_samples_own_prefix():
    ds = make_ds()
    prefix_rows = _prefix_rows(ds, lambda u, t: _own_list(ds, u, t))
    # the user's candidates_train row: items that no prefix list holds, so a fallback would show
    train_rows = _train_rows(ds, {u: [N_TRAIN_ITEMS + 2 * ds.n_users] for u in range(ds.n_users)})
    samples = build_samples(ds, n_candidates=4, negatives="retriever", seed=0, retriever_rows=train_rows, prefix_rows=prefix_rows)
    by_user: dict[int, set] = {}
    for s in samples:
        seen = set(ds.train_sequence(s.user)[: s.position + 1])
        usable = [i for i in _own_list(ds, s.user, s.position) if i not in seen]
        assert sorted(_negatives(s)) == sorted(usable[:3])  # exactly that prefix's first usable items
        by_user.setdefault(s.user, set()).add(frozenset(_negatives(s)))
    assert all(len(sets) > 1 for sets in by_user.values())  # the negatives differ from prefix to prefix
    # without the prefix file: every prefix of a user uses the user's candidates_train row
    old = build_samples(ds, n_candidates=4, negatives="retriever", seed=0, retriever_rows=train_rows)
    assert all(N_TRAIN_ITEMS + 2 * ds.n_users in _negatives(s) for s in old)
    assert not any(N_TRAIN_ITEMS + 2 * ds.n_users in _negatives(s) for s in samples)


def test_prefixes_missing_from_the_prefix_file_fall_back_to_candidates_train_and_are_logged(caplog):
    ds = make_ds()
    last2 = lambda u: list(range(1, len(ds.train_sequence(u))))[-2:]  # noqa: E731 (retriever.prefix_candidates: 2)
    prefix_rows = _prefix_rows(ds, lambda u, t: _own_list(ds, u, t), positions=last2)
    marker = N_TRAIN_ITEMS + 2 * ds.n_users
    train_rows = _train_rows(ds, {u: [marker] for u in range(ds.n_users)})
    with caplog.at_level("WARNING", logger="rerank.samples"):
        samples = build_samples(ds, n_candidates=4, negatives="retriever", seed=0, retriever_rows=train_rows, prefix_rows=prefix_rows)
    n_missing = sum(len(ds.train_sequence(u)) - 1 - 2 for u in range(ds.n_users))
    assert f"{n_missing} of {len(samples)} training prefixes have no row in candidates_train_prefixes.jsonl" in caplog.text
    for s in samples:
        assert (marker in _negatives(s)) == (s.position not in last2(s.user))


def test_prefix_file_must_be_this_datasets_train_split():
    ds = make_ds()
    rows = _prefix_rows(ds, lambda u, t: [1, 2])
    rows[1]["targets"][0] = rows[1]["targets"][1]  # shifted by one position
    with pytest.raises(PipelineError, match="not the user's train item there"):
        build_samples(ds, n_candidates=3, negatives="retriever", prefix_rows=rows)
    rows = _prefix_rows(ds, lambda u, t: [1, 2])
    rows[0]["user"] = "stranger"
    with pytest.raises(PipelineError, match="unknown user 'stranger'"):
        build_samples(ds, n_candidates=3, negatives="retriever", prefix_rows=rows)
    rows = _prefix_rows(ds, lambda u, t: [1, 2])
    with pytest.raises(PipelineError, match="negatives is 'random'"):
        build_samples(ds, n_candidates=3, negatives="random", prefix_rows=rows)


def _wide_catalogue(n_users: int = 4, n_items: int = 2000) -> SplitDataset:
    """Train sequences over items 1..12 in a catalogue of `n_items`."""
    seqs = [[(u + k) % 12 + 1 for k in range(10)] + [13 + 2 * u, 14 + 2 * u] for u in range(n_users)]
    return SplitDataset(
        name="wide", item_ids=[""] + [f"it{i}" for i in range(1, n_items + 1)],
        titles=[""] + [f"T{i}" for i in range(1, n_items + 1)], user_ids=[f"u{u}" for u in range(n_users)], sequences=seqs,
    )


def test_mix_takes_round_ratio_times_k_minus_1_retriever_negatives():
    ds = _wide_catalogue()

    def lists(u, t):  # per prefix: up to 3 of its history/target items (skipped), then 12 usable ones of its own
        return [*ds.train_sequence(u)[: min(t + 1, 3)], *range(1000 + 100 * t + 20 * u, 1012 + 100 * t + 20 * u)]

    def usable(u, t):
        return [i for i in lists(u, t) if i not in ds.train_sequence(u)[: t + 1]]

    rows = _prefix_rows(ds, lists)
    counts = set()
    for ratio in (0.0, 0.1, 0.25, 0.3, 0.55, 0.8, 1.0):
        want = round(ratio * 10)  # K = 11: 10 negatives
        counts.add(want)
        samples = build_samples(ds, n_candidates=11, negatives="mix", retriever_ratio=ratio, seed=2, prefix_rows=rows)
        for s in samples:
            negs = _negatives(s)
            assert len(negs) == 10 and len(set(negs)) == 10
            assert set(usable(s.user, s.position)[:want]) <= set(negs)  # the retriever's first `want`, in its order
        # Exactly `want` come from the retriever and the rest are random: the same samples as plain
        # "retriever" negatives from lists cut after their `want`-th usable item (topped up at random).
        cut = _prefix_rows(ds, lambda u, t: usable(u, t)[:want])
        assert samples == build_samples(ds, n_candidates=11, negatives="retriever", seed=2, prefix_rows=cut), ratio
        if 0 < want < 10:  # and not the samples of one more or one fewer retriever negative
            for other in (want - 1, want + 1):
                cut = _prefix_rows(ds, lambda u, t: usable(u, t)[:other])
                assert samples != build_samples(ds, n_candidates=11, negatives="retriever", seed=2, prefix_rows=cut)
    assert counts == {0, 1, 2, 3, 6, 8, 10}  # round(2.5) = 2, round(5.5) = 6: Python's round
    with pytest.raises(PipelineError, match="retriever_negative_ratio"):
        build_samples(ds, n_candidates=11, negatives="mix", retriever_ratio=1.2, prefix_rows=rows)
    with pytest.raises(PipelineError, match="'mix' needs candidates_train.jsonl"):
        build_samples(ds, n_candidates=11, negatives="mix")


def test_mix_ratio_0_is_random_and_ratio_1_is_retriever():
    ds = make_ds()
    prefix_rows = _prefix_rows(ds, lambda u, t: _own_list(ds, u, t))
    train_rows = _train_rows(ds, {u: [1, 2, 3, 4] for u in range(ds.n_users)})
    kw = dict(n_candidates=6, seed=4, retriever_rows=train_rows, prefix_rows=prefix_rows)
    random = build_samples(ds, n_candidates=6, seed=4)
    retriever = build_samples(ds, negatives="retriever", **kw)
    assert random != retriever
    assert build_samples(ds, negatives="mix", retriever_ratio=0.0, **kw) == random
    assert build_samples(ds, negatives="mix", retriever_ratio=1.0, **kw) == retriever
    half = build_samples(ds, negatives="mix", retriever_ratio=0.5, **kw)
    assert half != random and half != retriever
    # determinism: a sample depends only on (seed, user, t), also with mix and per-prefix lists
    capped = build_samples(ds, negatives="mix", retriever_ratio=0.5, max_samples=6, **kw)
    full = {(s.user, s.position): s for s in half}
    assert len(capped) == 6 and all(full[(s.user, s.position)] == s for s in capped)


def test_samples_from_config_passes_the_mix_ratio_and_prefix_rows():
    ds = make_ds()
    prefix_rows = _prefix_rows(ds, lambda u, t: _own_list(ds, u, t))
    train_rows = _train_rows(ds, {u: [1, 2, 3, 4] for u in range(ds.n_users)})
    cfg = SimpleNamespace(
        train_candidates=6, train_negatives="mix", retriever_negative_ratio=0.2, max_history=3, train_min_history=1,
        train_max_prefixes_per_user=None, max_train_samples=None, train_covered_only=False,
    )
    got = samples_from_config(ds, cfg, seed=1, retriever_rows=train_rows, prefix_rows=prefix_rows)
    assert got == build_samples(
        ds, n_candidates=6, negatives="mix", retriever_ratio=0.2, seed=1, history_len=3,
        retriever_rows=train_rows, prefix_rows=prefix_rows,
    )
    assert got != build_samples(ds, n_candidates=6, negatives="mix", retriever_ratio=0.2, seed=1, history_len=3, retriever_rows=train_rows)
    cfg.train_negatives = "random"  # the rows are ignored, not an error, when the config asks for random
    assert samples_from_config(ds, cfg, seed=1, retriever_rows=train_rows, prefix_rows=prefix_rows) == build_samples(
        ds, n_candidates=6, seed=1, history_len=3
    )


def test_covered_only_keeps_the_prefixes_whose_target_the_retriever_listed():
    """train_covered_only: a training prompt holds what a val/test prompt does, the target among its
    prefix's retriever list; a prefix the retriever missed (odd t here) would show the target as the
    one candidate the retriever did not propose."""
    ds = make_ds()
    lists = lambda u, t: [i for i in _own_list(ds, u, t) if t % 2 == 0 or i != ds.train_sequence(u)[t]]  # noqa: E731
    rows = _prefix_rows(ds, lists)
    kw = dict(n_candidates=4, negatives="retriever", seed=3, prefix_rows=rows)
    every = build_samples(ds, **kw)
    covered = build_samples(ds, covered_only=True, **kw)
    assert covered == [s for s in every if s.position % 2 == 0]  # the same prompts, the missed prefixes dropped
    assert any(s.position % 2 for s in every)
    for s in covered:
        seen = set(ds.train_sequence(s.user)[: s.position])
        listed = [i for i in lists(s.user, s.position) if i not in seen]
        assert s.target in listed and sorted(s.candidates) == sorted(listed[:4])  # exactly the retriever's top usable 4
    capped = build_samples(ds, covered_only=True, max_samples=5, **kw)  # the cap counts kept prompts
    assert len(capped) == 5 and all(s.position % 2 == 0 for s in capped)
    mixed = build_samples(ds, covered_only=True, **{**kw, "negatives": "mix"})
    assert [(s.user, s.position) for s in mixed] == [(s.user, s.position) for s in covered]
    with pytest.raises(PipelineError, match="candidates_train_prefixes.jsonl"):
        build_samples(ds, n_candidates=4, negatives="retriever", covered_only=True, retriever_rows=_train_rows(ds, {u: [1] for u in range(ds.n_users)}))
    with pytest.raises(PipelineError, match="no training prefix"):
        build_samples(ds, covered_only=True, **{**kw, "prefix_rows": _prefix_rows(ds, lambda u, t: [N_TRAIN_ITEMS + 2 * ds.n_users])})


def test_covered_only_needs_retriever_candidates():
    from pipeline.config import load_config

    with pytest.raises(PipelineError, match="train_covered_only"):
        load_config(None, ["reranker.train_covered_only=true"])  # the default negatives are random
    assert load_config(None, ["reranker.train_covered_only=true", "reranker.train_negatives=mix"]).reranker.train_covered_only
