"""Evidence about the LLM alone: its top-1 slots, hits off the retriever's top 1, a paired bootstrap against the retriever."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.metrics import candidate_rank, per_user_metrics
from pipeline.significance import CONFIDENCE, paired_tests
from rerank.evaluation.metrics import split_metrics

BOOTSTRAP_METRIC = "NDCG@10"  # metrics.json `bootstrap`: subset NDCG@10 against the retriever's order

BOOTSTRAP_RESAMPLES = 2000


def top1_slots(rankings: Sequence[Mapping[str, Any]], key: str = "scores") -> dict[str, Any]:
    """Where the top-1 of `key` sits in retriever order, over the rankings' (covered) users:
    `counts[i]` users whose top-ranked candidate is candidates[i] (ties to the earlier candidate,
    as `candidate_rank`), `max_share` the largest share and `max_slot` its slot, `target_counts`
    the same histogram of the targets (what a perfect reranker's top-1 would give)."""
    k = max((len(rk["candidates"]) for rk in rankings), default=0)
    counts, targets = [0] * k, [0] * k
    for rk in rankings:
        s = rk[key]
        counts[max(range(len(s)), key=lambda j: (s[j], -j))] += 1
        targets[list(rk["candidates"]).index(rk["target"])] += 1
    n = len(rankings)
    top = max(range(k), key=lambda j: (counts[j], -j)) if k else None
    return {"n": n, "counts": counts, "max_share": counts[top] / n if n else None, "max_slot": top, "target_counts": targets}


def top1_hit_non_top1(rankings: Sequence[Mapping[str, Any]], key: str = "scores") -> dict[str, Any]:
    """Among the users whose target is NOT the retriever's top-1: the share whose top-1 by `key` is
    the target (n such users, hits), against the chance rate 1/(K-1) of a pick among the others."""
    users = [rk for rk in rankings if rk["candidates"][0] != rk["target"]]
    hits = sum(1 for rk in users if candidate_rank(rk[key], rk["candidates"], rk["target"]) == 1)
    n = len(users)
    chance = sum(1.0 / (len(rk["candidates"]) - 1) for rk in users) / n if n else None
    return {"share": hits / n if n else None, "n": n, "hits": hits, "chance": chance}


def bootstrap_vs_retriever(
    rankings: Sequence[Mapping[str, Any]],
    keys: Mapping[str, str],
    seed: int,
    metric: str = BOOTSTRAP_METRIC,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Any]:
    """Paired bootstrap (`pipeline.significance.paired_tests`, per-user resampling, seeded) of the subset
    `metric` of each `keys` entry (name -> rankings field with its scores) minus the retriever's
    order, over the rankings' (covered) users: {name: {mean, ci_low, ci_high, p_bootstrap}}. Every
    comparison draws the same resampled users."""
    out: dict[str, Any] = {"metric": metric, "n": len(rankings), "resamples": n_resamples, "confidence": CONFIDENCE, "seed": seed}
    if not rankings:
        return out
    k = int(metric.split("@")[1])
    retriever = per_user_metrics([list(rk["candidates"]).index(rk["target"]) + 1 for rk in rankings], [k])
    for name, key in keys.items():
        system = per_user_metrics([candidate_rank(rk[key], rk["candidates"], rk["target"]) for rk in rankings], [k])
        res = paired_tests(
            {metric: np.asarray(retriever[metric])}, {metric: np.asarray(system[metric])}, [metric], n_resamples, seed
        )[metric]
        out[name] = {"mean": res.mean_diff, "ci_low": res.ci_low, "ci_high": res.ci_high, "p_bootstrap": res.p_bootstrap}
    return out


def llm_evidence(rows: Sequence[Mapping[str, Any]], rankings: Sequence[Mapping[str, Any]], seed: int) -> dict[str, Any]:
    """The metrics.json entries about the LLM alone, from rankings rows with `scores` (final),
    `llm_scores` and, when calibrated, `llm_raw_scores`: `llm_subset` / `llm_overall` (and
    `llm_raw_subset`), the top-1 slot histogram(s), the top-1 hit rate off the retriever's top-1,
    and the paired bootstrap of final and LLM alone against the retriever's order."""
    calibrated = bool(rankings) and "llm_raw_scores" in rankings[0]
    llm = split_metrics(rows, [dict(rk, scores=rk["llm_scores"]) for rk in rankings])
    out: dict[str, Any] = {"llm_subset": llm["subset"], "llm_overall": llm["overall"]}
    if calibrated:
        out["llm_raw_subset"] = split_metrics(rows, [dict(rk, scores=rk["llm_raw_scores"]) for rk in rankings])["subset"]
    out["llm_top1_slots"] = top1_slots(rankings, "llm_scores")
    if calibrated:
        out["llm_raw_top1_slots"] = top1_slots(rankings, "llm_raw_scores")
    out["llm_top1_hit_non_top1"] = top1_hit_non_top1(rankings, "llm_scores")
    keys = {"final_minus_retriever": "scores", "llm_minus_retriever": "llm_scores"}
    if calibrated:
        keys["llm_raw_minus_retriever"] = "llm_raw_scores"
    out["bootstrap"] = bootstrap_vs_retriever(rankings, keys, seed)
    return out
