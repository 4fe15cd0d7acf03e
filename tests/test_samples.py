"""Training samples (rerank/samples.py): train prefixes only, negatives, determinism, caps."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.data.dataset import SplitDataset
from pipeline.errors import PipelineError
from rerank.samples import build_samples, samples_from_config

N_TRAIN_ITEMS = 40  # items 1..40 appear in train sequences; 41.. only as val/test targets


def make_ds(n_users: int = 5) -> SplitDataset:
    """Users with train sequences over items 1..40 and val/test items that appear nowhere else."""
    seqs = []
    for u in range(n_users):
        train = [(u * 7 + 3 * k) % N_TRAIN_ITEMS + 1 for k in range(6 + u)]  # distinct within a user
        val, test = N_TRAIN_ITEMS + 1 + 2 * u, N_TRAIN_ITEMS + 2 + 2 * u
        seqs.append(train + [val, test])
    n_items = N_TRAIN_ITEMS + 2 * n_users
    return SplitDataset(
        name="synthetic",
        item_ids=[""] + [f"item{i}" for i in range(1, n_items + 1)],
        titles=[""] + [f"Title {i}" for i in range(1, n_items + 1)],
        user_ids=[f"user{u}" for u in range(n_users)],
        sequences=seqs,
    )


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
        train_max_prefixes_per_user=3, max_train_samples=None,
    )
    got = samples_from_config(ds, cfg, seed=5)
    assert got == build_samples(ds, n_candidates=4, seed=5, history_len=2, min_history=2, max_prefixes_per_user=3)
    assert all(len(s.candidates) == 4 and len(s.history) == 2 for s in got)
