"""Fusion with the retriever (`rerank.inference.fusion`): the standardisation, the two extremes of w, the
choice of w on validation users only (`rerank.run` finalise)."""
from __future__ import annotations

import math

import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError
from rerank.inference.fusion import fit_weight, fuse, fused_scores, retriever_scores, standardise
from rerank.run import finalise


def test_standardise():
    z = standardise([1.0, 2.0, 3.0, 6.0])
    assert sum(z) == pytest.approx(0.0, abs=1e-12)
    assert math.sqrt(sum(x * x for x in z) / len(z)) == pytest.approx(1.0)  # population std 1
    assert z == pytest.approx([(x - 3.0) / math.sqrt(3.5) for x in (1.0, 2.0, 3.0, 6.0)])
    assert standardise([4.0, 4.0, 4.0]) == [0.0, 0.0, 0.0]
    assert standardise([0.1] * 7) == [0.0] * 7  # a mean that rounds off 0.1 must not blow up into noise
    assert standardise([]) == []


def order(scores):
    return sorted(range(len(scores)), key=lambda j: (-scores[j], j))


def test_w_zero_is_the_llm_order_and_a_large_w_the_retrievers():
    llm = [0.1, 0.5, -2.0, 3.0, 0.7]
    retriever = [5.0, 4.0, 3.0, 2.0, 1.0]  # retriever order = candidates order
    assert order(fuse(llm, retriever, 0.0)) == order(llm) == [3, 4, 1, 0, 2]
    assert order(fuse(llm, retriever, 1000.0)) == [0, 1, 2, 3, 4]
    assert order(fuse(llm, [1.0] * 5, 1000.0)) == order(llm)  # a constant retriever changes nothing
    with pytest.raises(PipelineError, match="retriever scores"):
        fuse(llm, retriever[:4], 1.0)


def _rows(n, prefix, llm_right):
    """n covered users, 4 candidates, retriever scores descending; the target is the retriever's top-1
    and the LLM's last pick, or the LLM's top-1 and the retriever's last (llm_right)."""
    rows, llm = [], []
    for u in range(n):
        cands = [f"i{j}" for j in range(4)]
        target = cands[3] if llm_right else cands[0]
        rows.append({"user": f"{prefix}{u}", "history": [], "candidates": cands, "scores": [4.0, 3.0, 2.0, 1.0], "target": target})
        llm.append([0.0, 1.0, 2.0, 3.0])  # the LLM always prefers the retriever's last candidate
    return rows, llm


def test_fit_weight_picks_the_best_and_ties_go_to_the_smaller_weight():
    rows, llm = _rows(5, "u", llm_right=True)
    w, grid = fit_weight(rows, llm, retriever_scores(rows, rows), [10.0, 0.0, 0.5, 0.1])
    assert w == 0.0 and list(grid) == ["0.0", "0.1", "0.5", "10.0"]  # sorted, keyed str(w)
    assert grid["0.0"] == grid["0.1"] == 1.0 and grid["10.0"] < 1.0  # 0.0 and 0.1 tie: the smaller wins
    rows, llm = _rows(5, "u", llm_right=False)
    w, grid = fit_weight(rows, llm, retriever_scores(rows, rows), [0.0, 0.5, 2.0, 10.0])
    assert w == 2.0 and grid["2.0"] == grid["10.0"] == 1.0 and grid["0.0"] < 1.0
    with pytest.raises(PipelineError, match="disagree"):
        retriever_scores(rows[:1], rows[1:2])


def _raw(rows, llm):
    return [{**r, "scores": s, "label_scheme": "letters"} for r, s in zip(rows, llm)]


@pytest.mark.parametrize("val_llm_right", [True, False])
def test_w_is_fitted_on_val_only(val_llm_right):
    """Test rows built so that the other extreme of w wins on them: w follows val, whichever way."""
    val, val_llm = _rows(6, "v", llm_right=val_llm_right)
    test, test_llm = _rows(6, "t", llm_right=not val_llm_right)
    rcfg = load_config(None, ["reranker.fusion=true", "reranker.fusion_weights=[0.0, 0.5, 10.0]"]).reranker
    rankings, sections = finalise({"val": val, "test": test}, {"val": _raw(val, val_llm), "test": _raw(test, test_llm)}, {}, rcfg, 0)
    want = 0.0 if val_llm_right else 10.0
    assert sections["val"]["fusion"]["w"] == sections["test"]["fusion"]["w"] == want
    assert sections["val"]["fusion"]["grid"] == sections["test"]["fusion"]["grid"]
    assert sections["val"]["subset"]["NDCG@10"] == 1.0 and sections["test"]["subset"]["NDCG@10"] < 1.0  # test pays
    for split, rows, llm in (("val", val, val_llm), ("test", test, test_llm)):
        assert [r["llm_scores"] for r in rankings[split]] == llm and "llm_raw_scores" not in rankings[split][0]
        assert [r["scores"] for r in rankings[split]] == fused_scores(llm, [r["scores"] for r in rows], want)
        assert sections[split]["calibration"] == {"method": "none", "prior": {}}
        llm_right = (split == "val") == val_llm_right
        assert (sections[split]["llm_subset"]["NDCG@10"] == 1.0) == llm_right  # the LLM alone, whatever w


def test_fusion_off_keeps_the_llm_scores():
    val, llm = _rows(3, "v", llm_right=False)
    rcfg = load_config(None).reranker
    assert rcfg.fusion is False and rcfg.calibration == "none"
    rankings, sections = finalise({"val": val, "test": val}, {"val": _raw(val, llm), "test": _raw(val, llm)}, {}, rcfg, 0)
    assert [r["scores"] for r in rankings["test"]] == [r["llm_scores"] for r in rankings["test"]] == llm
    assert sections["test"]["fusion"] == {"w": 0.0, "grid": {}}
    assert sections["test"]["subset"] == sections["test"]["llm_subset"]
