"""Fusion of the LLM's scores with the retriever's: final = z(LLM) + w * z(retriever score).

z is the per-user standardisation over that user's candidates (mean 0, standard deviation 1; a
constant vector, which orders nothing, becomes zeros), so w is a trade-off on a common scale
whatever either model's score range. The retriever scores are the candidates file's `scores`.
w is chosen on the VALIDATION users only (`reranker.fusion_weights`: the best val subset NDCG@10,
ties to the smaller w) and then applied unchanged to test; `reranker.fusion: false` means w = 0 and
the LLM's scores as they are. w = 0 orders as the LLM; a large w as the retriever (its order breaks
the LLM's ties and vice versa).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics import candidate_rank, metrics_from_ranks

FIT_METRIC = "NDCG@10"  # what w maximises on the validation users


def standardise(values: Sequence[float]) -> list[float]:
    """(values - mean) / std (population std); zeros for a constant vector."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0 or np.all(v == v[0]):
        return [0.0] * len(v)
    sd = v.std()
    if not np.isfinite(sd) or sd == 0.0:
        return [0.0] * len(v)
    return ((v - v.mean()) / sd).tolist()


def fuse(llm: Sequence[float], retriever: Sequence[float], w: float) -> list[float]:
    """z(llm) + w * z(retriever), candidate by candidate."""
    if len(llm) != len(retriever):
        raise PipelineError(f"{len(llm)} LLM scores but {len(retriever)} retriever scores: rank the same candidates file")
    return [a + w * b for a, b in zip(standardise(llm), standardise(retriever))]


def retriever_scores(rows: Sequence[Mapping[str, Any]], rankings: Sequence[Mapping[str, Any]]) -> list[list[float]]:
    """Each rankings row's retriever scores (its user's candidates-file `scores`), in its order."""
    by_user = {row["user"]: row for row in rows}
    out = []
    for rk in rankings:
        row = by_user.get(rk["user"])
        if row is None or list(row["candidates"]) != list(rk["candidates"]):
            raise PipelineError(f"user {rk['user']!r}: rankings and candidates disagree: rank the same candidates file")
        out.append([float(s) for s in row["scores"]])
    return out


def fused_scores(llm: Sequence[Sequence[float]], retriever: Sequence[Sequence[float]], w: float) -> list[list[float]]:
    return [fuse(a, b, w) for a, b in zip(llm, retriever)]


def subset_metric(rankings: Sequence[Mapping[str, Any]], scores: Sequence[Sequence[float]], metric: str = FIT_METRIC) -> float:
    """`metric` (e.g. NDCG@10) over the rankings' users when ranked by `scores` (`pipeline.metrics`)."""
    k = int(metric.split("@")[1])
    ranks = [candidate_rank(s, rk["candidates"], rk["target"]) for rk, s in zip(rankings, scores)]
    return metrics_from_ranks(ranks, [k])[metric]


def fit_weight(
    rankings: Sequence[Mapping[str, Any]],
    llm: Sequence[Sequence[float]],
    retriever: Sequence[Sequence[float]],
    weights: Sequence[float],
    metric: str = FIT_METRIC,
) -> tuple[float, dict[str, float]]:
    """(w, grid): the weight of `weights` whose fused scores give the best `metric` on `rankings`
    (the VALIDATION users; ties to the smaller w), and every weight's value, keyed str(w)."""
    if not weights:
        raise PipelineError("reranker.fusion_weights is empty: give at least one weight")
    zl = [standardise(s) for s in llm]
    zr = [standardise(s) for s in retriever]
    grid: dict[str, float] = {}
    best_w, best = None, None
    for w in sorted({float(w) for w in weights}):
        value = subset_metric(rankings, [[a + w * b for a, b in zip(x, y)] for x, y in zip(zl, zr)], metric)
        grid[str(w)] = value
        if best is None or value > best:  # strictly better: a tie keeps the smaller w
            best_w, best = w, value
    return best_w, grid
