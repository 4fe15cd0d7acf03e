"""Candidates: history masked, retriever order kept, target not forced in; file round trip."""
import json

import pytest
import torch

from pipeline.candidates import read_rows, write_rows
from pipeline.data import SplitDataset
from pipeline.errors import PipelineError
from retrieval.candidates import retrieve


def _dataset():
    # 3 users over 8 items; original ids are "i1".."i8"
    seqs = [[1, 2, 3, 4, 5], [8, 7, 6, 5, 4], [2, 4, 6, 8, 1]]
    return SplitDataset(
        name="toy", item_ids=[""] + [f"i{k}" for k in range(1, 9)], titles=[""] + [f"T{k}" for k in range(1, 9)],
        user_ids=["a", "b", "c"], sequences=seqs,
    )


def _fixed_scores(inputs):
    # the same scores for everyone: item k scores k, so item 8 is best; column 0 is padding
    return torch.arange(9, dtype=torch.float).repeat(len(inputs), 1)


def test_candidates_exclude_history_keep_order_and_do_not_force_target():
    ds = _dataset()
    rows, section = retrieve(_fixed_scores, ds, "test", top_k=3)
    for row, seq in zip(rows, ds.sequences):
        history = [ds.item_ids[i] for i in seq[:-1]]
        assert row["history"] == history
        assert not set(row["candidates"]) & set(history)
        assert row["scores"] == sorted(row["scores"], reverse=True)
    # user a: history i1..i4 -> best remaining by score: i8, i7, i6; target i5 is NOT forced in
    assert rows[0]["candidates"] == ["i8", "i7", "i6"] and rows[0]["target"] == "i5"
    # user b: history i8,i7,i6,i5 -> i4 (target), i3, i2
    assert rows[1]["candidates"] == ["i4", "i3", "i2"] and rows[1]["target"] == "i4"
    # user c: history i2,i4,i6,i8 -> i7, i5, i3; target i1 ranks 4th among the 4 remaining items
    assert rows[2]["candidates"] == ["i7", "i5", "i3"]
    assert section["n_users"] == 3 and section["n_covered"] == 1
    assert section["coverage"] == pytest.approx(1 / 3)
    # full-catalogue ranks: a -> 4 (i8,i7,i6 ahead), b -> 1, c -> 4
    assert section["retriever"]["Recall@1"] == pytest.approx(1 / 3)
    assert section["retriever"]["Recall@5"] == pytest.approx(1.0)
    assert section["retriever"]["MRR@5"] == pytest.approx((0.25 + 1 + 0.25) / 3)


def test_fewer_eligible_items_than_k():
    ds = _dataset()
    rows, _ = retrieve(_fixed_scores, ds, "test", top_k=6)
    assert all(len(r["candidates"]) == 4 for r in rows)  # 8 items - 4 history items
    assert all(len(r["scores"]) == 4 for r in rows)


def test_file_round_trip_and_validation(tmp_path):
    ds = _dataset()
    rows, _ = retrieve(_fixed_scores, ds, "val", top_k=3)
    path = tmp_path / "candidates_val.jsonl"
    write_rows(path, rows)
    assert read_rows(path, known_items=set(ds.item_ids[1:])) == rows
    with pytest.raises(PipelineError, match="line 1: unknown item id 'i8'"):
        read_rows(path, known_items={"i2"})
    bad = dict(rows[0])
    del bad["target"]
    path.write_text(json.dumps(rows[1]) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(PipelineError, match="line 2: field 'target' missing"):
        read_rows(path)
    path.write_text(json.dumps(rows[1])[:-5] + "\n")
    with pytest.raises(PipelineError, match="line 1 is not valid JSON"):
        read_rows(path)
