"""Per-prefix train candidates (candidates_train_prefixes.jsonl): the retriever's top-k after every
kept prefix of each train sequence, that prefix masked; its file format, the retriever stage that
writes it, and the config keys behind it and its reranker use."""
import json

import pytest
import torch

from pipeline.candidates import PREFIX_FILE, prefix_candidates_path, read_prefix_rows, write_prefix_rows
from pipeline.config import load_config
from pipeline.data import SplitDataset, load_dataset
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir
from retrieval.candidates import prefix_positions, retrieve, retrieve_prefixes
from retrieval.run import retriever_finished, train_retriever

N_ITEMS = 30


def toy_dataset() -> SplitDataset:
    seqs = [
        [3, 1, 4, 15, 9, 26, 5, 2, 6],  # train 3 1 4 15 9 26 5 | val 2 | test 6
        [8, 7, 6, 5, 4],  # train 8 7 6 | val 5 | test 4
        [2, 30, 11, 29, 12, 28, 13],  # train 2 30 11 29 12 | val 28 | test 13
        [10, 20, 1],  # train 10: no prefix with an input item
    ]
    return SplitDataset(
        name="toy", item_ids=[""] + [f"i{k}" for k in range(1, N_ITEMS + 1)],
        titles=[""] + [f"T{k}" for k in range(1, N_ITEMS + 1)], user_ids=["a", "b", "c", "d"], sequences=seqs,
    )


def stub_scores(inputs: list[list[int]]) -> torch.Tensor:
    """Scores that depend on the input (so prefixes differ) and tie often (7 values): the tie rule
    (lower item id first) decides many slots."""
    out = torch.zeros(len(inputs), N_ITEMS + 1)
    for b, seq in enumerate(inputs):
        for i in range(N_ITEMS + 1):
            out[b, i] = float((i * 3 + len(seq) * 5 + (seq[-1] if seq else 0)) % 7)
    return out


def hand_top_k(prefix: list[int], k: int) -> list[int]:
    """The ranking by hand: items outside the prefix, best score first, ties to the lower id."""
    scores = stub_scores([prefix])[0]
    free = [i for i in range(1, N_ITEMS + 1) if i not in prefix]
    return sorted(free, key=lambda i: (-scores[i].item(), i))[:k]


@pytest.mark.parametrize("last_n", [None, 2])
def test_prefix_candidates_are_the_hand_ranking_with_the_prefix_masked(tmp_path, last_n):
    ds = toy_dataset()
    rows = retrieve_prefixes(stub_scores, ds, top_k=5, last_n=last_n, batch_size=3, progress=False)
    path = tmp_path / PREFIX_FILE
    write_prefix_rows(path, rows)
    assert read_prefix_rows(path, known_items=set(ds.item_ids[1:])) == rows  # the file round trip
    assert [r["user"] for r in rows] == ds.user_ids  # one line per user, in user order
    n_checked = 0
    for u, row in enumerate(rows):
        train = ds.train_sequence(u)
        every = list(range(1, len(train)))
        assert row["positions"] == (every if last_n is None else every[-last_n:])
        assert row["positions"] == prefix_positions(ds, u, last_n)
        for t, target, cands in zip(row["positions"], row["targets"], row["candidates"]):
            assert target == ds.item_ids[train[t]]
            assert cands == [ds.item_ids[i] for i in hand_top_k(train[:t], 5)]
            assert not set(cands) & {ds.item_ids[i] for i in train[:t]}  # the prefix itself is masked
            n_checked += 1
    assert rows[3]["positions"] == [] and rows[3]["candidates"] == []  # a one-item train sequence
    assert n_checked == (6 + 2 + 4 if last_n is None else 2 + 2 + 2)
    # the prefixes of one user really get different candidates (the input is not ignored)
    assert len({tuple(c) for c in rows[0]["candidates"]}) > 1


def test_batching_does_not_change_the_file_and_the_last_prefix_is_candidates_train():
    ds = toy_dataset()
    one = retrieve_prefixes(stub_scores, ds, top_k=4, batch_size=1, progress=False)
    assert retrieve_prefixes(stub_scores, ds, top_k=4, batch_size=1000, progress=False) == one
    train_rows, _ = retrieve(stub_scores, ds, "train", top_k=4)
    for row, train_row in zip(one, train_rows):
        if row["positions"]:  # the last prefix is the candidates_train.jsonl input
            assert row["candidates"][-1] == train_row["candidates"] and row["targets"][-1] == train_row["target"]


def test_fewer_free_items_than_top_k():
    ds = toy_dataset()
    rows = retrieve_prefixes(stub_scores, ds, top_k=N_ITEMS, progress=False)
    for u, row in enumerate(rows):
        for t, cands in zip(row["positions"], row["candidates"]):
            assert len(cands) == N_ITEMS - t  # masked items are never candidates


def test_a_wrong_score_shape_is_an_error():
    ds = toy_dataset()
    with pytest.raises(RuntimeError, match="shape"):
        retrieve_prefixes(lambda inputs: torch.zeros(len(inputs), N_ITEMS), ds, top_k=3, progress=False)


def _stage_config(tmp_path, prefix_candidates):
    return load_config(None, [
        "retriever.model=pop", "data.max_users=12", f"data.cache_dir={tmp_path / 'cache'}",
        f"retriever.prefix_candidates={prefix_candidates}", "retriever.top_k=6",
    ])


def test_retriever_stage_writes_the_prefix_file_and_needs_it_to_be_finished(tmp_path):
    cfg = _stage_config(tmp_path, 3)
    run = RunDir(tmp_path / "run").start(cfg, [])
    train_retriever(cfg, run)
    ds = load_dataset(cfg.data)
    rows = read_prefix_rows(prefix_candidates_path(run.path), known_items=set(ds.item_ids[1:]))
    assert len(rows) == ds.n_users and all(len(r["positions"]) == 3 for r in rows)  # ML-100K users have >= 3 train items
    # popularity: train counts, ties to the lower id, the prefix masked
    counts = torch.zeros(ds.n_items + 1)
    for u in range(ds.n_users):
        for i in ds.train_sequence(u):
            counts[i] += 1
    for u in (0, 5, ds.n_users - 1):
        train = ds.train_sequence(u)
        for t, cands in zip(rows[u]["positions"], rows[u]["candidates"]):
            free = [i for i in range(1, ds.n_items + 1) if i not in train[:t]]
            want = sorted(free, key=lambda i: (-counts[i].item(), i))[:6]
            assert cands == [ds.item_ids[i] for i in want]
    assert retriever_finished(run.path, 3) and retriever_finished(run.path, None)
    prefix_candidates_path(run.path).unlink()
    assert not retriever_finished(run.path, 3) and not retriever_finished(run.path, None)
    assert retriever_finished(run.path, 0)  # not configured: not required


def test_retriever_stage_without_prefix_candidates_writes_no_prefix_file(tmp_path):
    cfg = _stage_config(tmp_path, 0)
    run = RunDir(tmp_path / "run").start(cfg, [])
    prefix_candidates_path(run.path).write_text("stale\n")  # an earlier run's file must not survive
    train_retriever(cfg, run)
    assert not prefix_candidates_path(run.path).exists()
    assert retriever_finished(run.path, 0)


def _good_row():
    return {"user": "a", "positions": [1, 2], "targets": ["i1", "i4"], "candidates": [["i2", "i3"], ["i5", "i2"]]}


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("targets"), "line 2: field 'targets' missing or not a list"),
    (lambda r: r.update(user=7), "line 2: field 'user' missing or not a str"),
    (lambda r: r.update(positions=[2, 1]), "line 2: positions are not strictly ascending"),
    (lambda r: r.update(positions=[0, 1]), "line 2: position 0 is not an integer >= 1"),
    (lambda r: r.update(positions=[1, "2"]), "line 2: position '2' is not an integer >= 1"),
    (lambda r: r.update(targets=["i1"]), "line 2: 1 targets for 2 positions"),
    (lambda r: r.update(candidates=[["i2"]]), "line 2: 1 candidates for 2 positions"),
    (lambda r: r.update(targets=["i1", 4]), "line 2: field 'targets' holds 4, not an item id string"),
    (lambda r: r.update(candidates=[["i2"], ["i5", 3]]), "line 2: the candidates of position 2 are not a list of item id strings"),
    (lambda r: r.update(candidates=[["i2"], "i5"]), "line 2: the candidates of position 2 are not a list of item id strings"),
    (lambda r: r.update(candidates=[["i2", "i2"], ["i5"]]), "line 2: candidate 'i2' is listed twice at position 1"),
    (lambda r: r.update(candidates=[["i2"], ["zz"]]), "line 2: unknown item id 'zz'"),
    (lambda r: r.update(user="b"), "line 2: user 'b' already has line 1"),
])
def test_malformed_prefix_file_is_a_one_line_error(tmp_path, mutate, message):
    path = tmp_path / PREFIX_FILE
    first = {**_good_row(), "user": "b"}
    bad = _good_row()
    mutate(bad)
    path.write_text(json.dumps(first) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(PipelineError) as err:
        read_prefix_rows(path, known_items={f"i{k}" for k in range(1, 9)})
    text = str(err.value)
    assert message in text and str(path) in text and "regenerate" in text and "\n" not in text
    path.write_text(json.dumps(first) + "\n" + json.dumps(_good_row()) + "\n")  # the same file, fixed, reads
    assert len(read_prefix_rows(path, known_items={f"i{k}" for k in range(1, 9)})) == 2


def test_truncated_missing_and_non_utf8_prefix_files(tmp_path):
    path = tmp_path / PREFIX_FILE
    path.write_text(json.dumps(_good_row())[:-4] + "\n")
    with pytest.raises(PipelineError, match=r"line 1 is not valid JSON \(truncated\?\)"):
        read_prefix_rows(path)
    path.write_bytes(b'{"user": "\xff"}\n')
    with pytest.raises(PipelineError, match="line 1 is not valid UTF-8"):
        read_prefix_rows(path)
    path.write_text("[1, 2]\n")
    with pytest.raises(PipelineError, match="line 1 is not a JSON object"):
        read_prefix_rows(path)
    with pytest.raises(PipelineError, match="prefix candidates file not found: .*prefix_candidates"):
        read_prefix_rows(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("override, want", [
    ("retriever.prefix_candidates=null", None),
    ("retriever.prefix_candidates=5", 5),
    ("reranker.train_negatives=mix", "mix"),
    ("reranker.retriever_negative_ratio=0", 0.0),
    ("reranker.retriever_negative_ratio=1", 1.0),
])
def test_config_accepts_the_new_keys(override, want):
    key, _ = override.split("=")
    section, name = key.split(".")
    assert getattr(getattr(load_config(None, [override]), section), name) == want


@pytest.mark.parametrize("override", [
    "retriever.prefix_candidates=-1",
    "retriever.prefix_candidates=all",
    "reranker.train_negatives=hard",
    "reranker.retriever_negative_ratio=1.5",
    "reranker.retriever_negative_ratio=-0.1",
    "reranker.retriever_negative_ratio=half",
])
def test_config_rejects_bad_values_of_the_new_keys(override):
    key = override.split("=")[0]
    with pytest.raises(PipelineError, match=key.split(".")[1]) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_config_defaults():
    cfg = load_config(None)
    assert cfg.retriever.prefix_candidates == 0 and cfg.reranker.train_negatives == "random"
    assert cfg.reranker.retriever_negative_ratio == 0.5
    assert load_config(None, ["retriever.prefix_candidates=null"]).retriever.prefix_candidates is None
