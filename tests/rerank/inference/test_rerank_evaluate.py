"""Reranking a split (`rank_split`) and its metrics section (`split_metrics`)."""
from __future__ import annotations

import math

import pytest
import torch

from pipeline.config import load_config
from pipeline.data.dataset import SplitDataset, titles_by_item
from pipeline.errors import PipelineError
from pipeline.metrics import coverage_weighted
from rerank.evaluation import evidence
from rerank.evaluation.metrics import split_metrics
from rerank.evaluation.report import results_table
from rerank.inference import rank_split as rank_split_module
from rerank.inference.rank_split import rank_split
from rerank.model.sources import load_model_and_tokenizer
from rerank.model.standins import TINY_QWEN2
from rerank.prompting.labels import LETTERS
from rerank.prompting.style import make_style
from tests.helpers.rows import CFG, ITEMS, ROWS
from tests.helpers.tokenizers import CACHE_DIR, qwen_tokenizer

# Reranker scores (candidates order). Target ranks: a 1, b 2, d 1 (a tie with d's first candidate
# goes to the earlier one, so d's target needs a strictly higher score).
RERANKER = {
    "a": [0.1, 0.2, 0.9, 0.3, 0.0],
    "b": [0.5, 0.8, 0.1, 0.0, 0.2],
    "d": [0.3, 0.0, 0.0, 0.1, 0.4],
}


def _fake_rank_rows(seen: list):
    def fake(model, tokenizer, style, rows, titles, batch_size, permutations, seed, progress):
        seen.extend(r["user"] for r in rows)
        return [RERANKER[r["user"]] for r in rows]

    return fake


def _ndcg(r: int) -> float:
    return 1.0 / math.log2(r + 1)


def test_hand_built_rows_give_exact_metrics(monkeypatch):
    seen: list = []
    monkeypatch.setattr(rank_split_module, "rank_rows", _fake_rank_rows(seen))
    tok = qwen_tokenizer()
    rankings = rank_split(None, tok, make_style(tok, LETTERS), ROWS, ITEMS, CFG, progress=False)
    m = split_metrics(ROWS, rankings)
    assert seen == ["a", "b", "d"]  # the uncovered user c never reaches the model
    assert m["n_users"] == 4 and m["n_covered"] == 3 and m["coverage"] == 0.75
    # Reranker on the covered users: ranks 1, 2, 1.
    sub = m["subset"]
    assert sub["Recall@1"] == pytest.approx(2 / 3) and sub["NDCG@1"] == pytest.approx(2 / 3)
    assert sub["Recall@5"] == pytest.approx(1.0)
    assert sub["NDCG@5"] == pytest.approx((1 + _ndcg(2) + 1) / 3)
    assert sub["MRR@5"] == pytest.approx((1 + 0.5 + 1) / 3)
    # Overall: coverage-weighted, every key.
    assert set(m["overall"]) == set(sub) == {f"{n}@{k}" for k in (1, 5, 10, 20) for n in ("NDCG", "Recall", "MRR")}
    for key, value in sub.items():
        assert m["overall"][key] == pytest.approx(value * 0.75)
    # Retriever order on the covered users: ranks 3, 1, 5; over all users: 3, 1, miss, 5.
    rs = m["retriever_subset"]
    assert rs["Recall@1"] == pytest.approx(1 / 3) and rs["Recall@5"] == pytest.approx(1.0)
    assert rs["NDCG@5"] == pytest.approx((_ndcg(3) + 1 + _ndcg(5)) / 3)
    assert rs["MRR@5"] == pytest.approx((1 / 3 + 1 + 1 / 5) / 3)
    r = m["retriever"]
    assert r["NDCG@5"] == pytest.approx((_ndcg(3) + 1 + _ndcg(5)) / 4)
    assert r["Recall@1"] == pytest.approx(1 / 4) and r["Recall@20"] == pytest.approx(3 / 4)
    assert r == pytest.approx(coverage_weighted(rs, 3, 4))  # the same identity holds for the retriever
    # Rankings rows: covered users only, candidates-file fields + reranker scores + label scheme.
    assert [x["user"] for x in rankings] == ["a", "b", "d"]
    for x, row in zip(rankings, [ROWS[0], ROWS[1], ROWS[3]]):
        assert x["scores"] == RERANKER[row["user"]] and x["label_scheme"] == "letters"
        assert {k: x[k] for k in ("user", "history", "candidates", "target")} == {k: row[k] for k in ("user", "history", "candidates", "target")}


def test_split_metrics_refuses_rankings_of_other_rows():
    rankings = [{**ROWS[i], "scores": RERANKER[ROWS[i]["user"]]} for i in (0, 1, 3)]
    assert split_metrics(ROWS, rankings)["n_covered"] == 3
    with pytest.raises(PipelineError, match="do not match"):
        split_metrics(ROWS, rankings[:2])
    with pytest.raises(PipelineError, match="twice"):
        split_metrics(ROWS, rankings + rankings[:1])
    other = [dict(rankings[0], candidates=list(reversed(rankings[0]["candidates"])))] + rankings[1:]
    with pytest.raises(PipelineError, match="disagree"):
        split_metrics(ROWS, other)
    with pytest.raises(PipelineError, match="no users"):
        split_metrics([], [])


def test_results_table_shows_retriever_and_reranker_subset_and_overall():
    rankings = [{**ROWS[i], "scores": RERANKER[ROWS[i]["user"]]} for i in (0, 1, 3)]
    table = results_table(split_metrics(ROWS, rankings))
    lines = table.strip().split("\n")
    assert lines[0] == "coverage 0.7500 (3/4 users)"
    assert lines[2] == "| | NDCG@5 | Recall@5 | MRR@5 | NDCG@10 | Recall@10 | MRR@10 |"
    assert lines[5].startswith("| Reranker (subset) | ") and f"{(1 + 0.5 + 1) / 3:.4f}" in lines[5]
    assert lines[7].startswith("| Reranker (overall) | ") and f"{(1 + 0.5 + 1) / 4:.4f}" in lines[7]
    assert [ln.split(" | ")[0] for ln in lines[4:]] == ["| Retriever (subset)", "| Reranker (subset)", "| Retriever (overall)", "| Reranker (overall)"]


def test_ranking_config_is_validated():
    cfg = load_config(None, ["reranker.rank_batch_size=4", "reranker.rank_permutations=3"]).reranker
    assert (cfg.rank_batch_size, cfg.rank_permutations) == (4, 3)
    assert (CFG.rank_batch_size, CFG.rank_permutations) == (16, 1)
    for key in ("rank_batch_size", "rank_permutations"):
        with pytest.raises(PipelineError, match=key):
            load_config(None, [f"reranker.{key}=0"])


def test_titles_by_item_maps_original_ids():
    ds = SplitDataset(name="x", item_ids=["", "10", "7"], titles=["", "Ten", "Seven"], user_ids=["u"], sequences=[[1, 2, 1]])
    assert titles_by_item(ds) == {"10": "Ten", "7": "Seven"}


def test_real_model_ranks_only_covered_users_with_permutations():
    model, tok = load_model_and_tokenizer(TINY_QWEN2, cache_dir=CACHE_DIR)
    prompts_seen: list[int] = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: prompts_seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    cfg = load_config(None, ["reranker.rank_permutations=2", "reranker.rank_batch_size=8"]).reranker
    try:
        rankings = rank_split(model, tok, make_style(tok, LETTERS), ROWS, ITEMS, cfg, seed=5, progress=False)
    finally:
        hook.remove()
    assert sum(prompts_seen) == 3 * 2  # 3 covered users x 2 orders; letters need one pass each
    assert [x["user"] for x in rankings] == ["a", "b", "d"]
    assert all(len(x["scores"]) == 5 and all(s < 0 for s in x["scores"]) for x in rankings)  # log-probs
    m = split_metrics(ROWS, rankings)
    assert m["n_covered"] == 3 and m["overall"]["NDCG@10"] == pytest.approx(m["subset"]["NDCG@10"] * 0.75)
    again = rank_split(model, tok, make_style(tok, LETTERS), ROWS, ITEMS, cfg, seed=5, progress=False)
    assert [x["scores"] for x in again] == [x["scores"] for x in rankings]  # seeded: deterministic
    assert torch.is_grad_enabled()  # inference_mode did not leak


# ----------------------------------------------------------------------------------------
# The LLM-alone evidence of metrics.json (`llm_evidence` and its parts)


def _rankings(llm: dict, final: dict | None = None, raw: dict | None = None) -> list[dict]:
    out = []
    for row in (ROWS[0], ROWS[1], ROWS[3]):
        u = row["user"]
        rk = {**row, "scores": (final or llm)[u], "llm_scores": llm[u]}
        if raw is not None:
            rk["llm_raw_scores"] = raw[u]
        out.append({**rk, "label_scheme": "letters"})
    return out


def test_top1_slots_and_hits_off_the_retrievers_top1():
    rk = _rankings(RERANKER)
    # LLM top-1: a -> slot 2 (its target), b -> slot 1 (not its target, i5 at slot 0), d -> slot 4
    # (its target; the 0.0 tie elsewhere does not matter). Targets sit in slots 2, 0, 4.
    t = evidence.top1_slots(rk, "llm_scores")
    assert t == {"n": 3, "counts": [0, 1, 1, 0, 1], "max_share": 1 / 3, "max_slot": 1, "target_counts": [1, 0, 1, 0, 1]}
    tied = evidence.top1_slots([{**rk[0], "llm_scores": [0.5] * 5}], "llm_scores")
    assert tied["counts"] == [1, 0, 0, 0, 0] and tied["max_share"] == 1.0  # ties: the earlier candidate, as candidate_rank
    # Users whose target is not the retriever's top-1: a and d (b's target is i5, its top-1).
    h = evidence.top1_hit_non_top1(rk, "llm_scores")
    assert h == {"share": 1.0, "n": 2, "hits": 2, "chance": pytest.approx(1 / 4)}
    miss = evidence.top1_hit_non_top1([{**rk[0], "llm_scores": [1.0, 0, 0, 0, 0]}], "llm_scores")
    assert miss["share"] == 0.0 and miss["n"] == 1


def test_bootstrap_on_a_hand_made_case():
    # Two users: a (retriever rank 3 -> reranker rank 1: NDCG@10 diff 1 - 1/log2(4) = 0.5) and b
    # (rank 1 -> rank 1: diff 0). Resampled means are 0, 0.25 or 0.5 with chance 1/4, 1/2, 1/4.
    rk = [{**ROWS[0], "scores": [0, 0, 1, 0, 0]}, {**ROWS[1], "scores": [1, 0, 0, 0, 0]}]
    b = evidence.bootstrap_vs_retriever(rk, {"final_minus_retriever": "scores"}, seed=0)
    assert b["n"] == 2 and b["metric"] == "NDCG@10" and b["resamples"] == 2000
    assert b["final_minus_retriever"]["mean"] == pytest.approx(0.25)
    assert (b["final_minus_retriever"]["ci_low"], b["final_minus_retriever"]["ci_high"]) == (0.0, 0.5)
    # The retriever's own order against itself: exactly 0, a degenerate interval.
    same = evidence.bootstrap_vs_retriever([{**r, "x": [-float(j) for j in range(5)]} for r in rk], {"same": "x"}, seed=0)
    assert same["same"]["mean"] == same["same"]["ci_low"] == same["same"]["ci_high"] == 0.0
    assert evidence.bootstrap_vs_retriever(rk, {"final_minus_retriever": "scores"}, seed=0) == b  # same seed, same numbers


def test_llm_evidence_and_the_side_by_side_table():
    final = {"a": [0.0, 0.0, 0.0, 0.0, 1.0], "b": [1.0, 0.0, 0.0, 0.0, 0.0], "d": [1.0, 0.0, 0.0, 0.0, 0.0]}
    raw = {u: [1.0, 0.0, 0.0, 0.0, 0.0] for u in "abd"}  # the raw LLM always picks slot 0
    rk = _rankings(RERANKER, final=final, raw=raw)
    sec = split_metrics(ROWS, rk)
    ev = evidence.llm_evidence(ROWS, rk, seed=0)
    assert ev["llm_subset"] == split_metrics(ROWS, [dict(r, scores=r["llm_scores"]) for r in rk])["subset"]
    assert ev["llm_subset"]["Recall@1"] == pytest.approx(2 / 3) and ev["llm_raw_subset"]["Recall@1"] == pytest.approx(1 / 3)
    assert ev["llm_overall"]["NDCG@10"] == pytest.approx(ev["llm_subset"]["NDCG@10"] * 0.75)
    assert ev["llm_raw_top1_slots"]["counts"] == [3, 0, 0, 0, 0] and ev["llm_raw_top1_slots"]["max_share"] == 1.0
    assert set(ev["bootstrap"]) >= {"final_minus_retriever", "llm_minus_retriever", "llm_raw_minus_retriever"}
    sec.update(ev, fusion={"w": 0.5, "grid": {"0.0": 0.4, "0.5": 0.6}}, calibration={"method": "permuted", "prior": {"5": [0.4, 0.1, 0.0, -0.2, -0.3]}})
    lines = results_table(sec).split("\n")
    assert [ln.split(" | ")[0] for ln in lines[4:11]] == [
        "| Retriever (subset)", "| LLM raw (subset)", "| LLM calibrated (subset)", "| Reranker (subset)",
        "| Retriever (overall)", "| LLM calibrated (overall)", "| Reranker (overall)",
    ]
    text = "\n".join(lines)
    assert "w = 0.5 chosen on val NDCG@10 (w=0.0 0.4000, w=0.5 0.6000)" in text
    assert "Calibration permuted: position prior (K=5, slot 1 first) +0.400 +0.100 +0.000 -0.200 -0.300" in text
    assert "LLM raw top-1 by retriever slot (1..5, 3 users): 3 0 0 0 0; max share 1.000 (slot 1)" in text
    assert "(2/2 users; chance 1/(K-1) = 0.250)" in text
