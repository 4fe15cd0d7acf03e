"""Ranking metrics with one relevant item per user: Recall@k, NDCG@k, MRR@k.

Everything is computed from the 1-based rank of the target; `None` means the target was not
ranked at all (e.g. it is not among a user's candidates) and scores 0 at every k.
Ties are broken by item order (lower index first), the same order `torch.topk`/a stable sort
gives, so a metric and the candidates file never disagree about who is ahead.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

from pipeline.config import METRIC_KS
from pipeline.errors import PipelineError


def check_finite(scores: Sequence[float], where: str) -> None:
    """Refuse a NaN or infinite score with a one-line error naming `where` (the stage, split and
    user). Every comparison with NaN is False, so a NaN target would otherwise rank FIRST and score
    a perfect metric; an infinity ties with its like and hides the model's order. Both mean a
    diverged model or a broken input, never a ranking to report."""
    bad = next((i for i, x in enumerate(scores) if not math.isfinite(x)), None)
    if bad is not None:
        raise PipelineError(
            f"{where}: score {scores[bad]!r} of candidate {bad + 1} is not finite (a diverged model, e.g. too high a "
            "learning rate, or a NaN in the input): no metric is computed over it; fix the cause and rerun"
        )


def metric_keys(ks: Iterable[int]) -> list[str]:
    return [f"{name}@{k}" for k in ks for name in ("NDCG", "Recall", "MRR")]


def per_user_metrics(ranks: Sequence[Optional[int]], ks: Iterable[int] = METRIC_KS) -> dict[str, list[float]]:
    """Each user's Recall/NDCG/MRR@k from its 1-based target rank (None = missed scores 0), in
    user order. The one place the formulas live: `metrics_from_ranks` averages these, and paired
    significance tests (`pipeline.significance.paired_tests`) resample them user by user."""
    ks = list(ks)
    out: dict[str, list[float]] = {}
    for k in ks:
        hit = [r is not None and r <= k for r in ranks]
        out[f"NDCG@{k}"] = [1.0 / math.log2(r + 1) if h else 0.0 for r, h in zip(ranks, hit)]
        out[f"Recall@{k}"] = [1.0 if h else 0.0 for h in hit]
        out[f"MRR@{k}"] = [1.0 / r if h else 0.0 for r, h in zip(ranks, hit)]
    return {key: out[key] for key in metric_keys(ks)}


def metrics_from_ranks(ranks: Sequence[Optional[int]], ks: Iterable[int] = METRIC_KS) -> dict[str, float]:
    """Mean Recall/NDCG/MRR@k over users from each user's 1-based target rank (None = missed)."""
    ks = list(ks)
    n = len(ranks)
    if n == 0:
        return {key: 0.0 for key in metric_keys(ks)}
    # Adding the misses' 0.0 terms leaves every float sum exactly as the hits alone give it.
    return {key: sum(values) / n for key, values in per_user_metrics(ranks, ks).items()}


def full_catalogue_ranks(scores: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """1-based rank of each target among all items not masked.

    scores: (B, V) item scores; targets: (B,) item indices; masked: (B, V) bool, True for items
    that cannot be recommended (padding index, the user's input history). The target itself is
    never masked. Ties go to the lower item index. A non-finite score of an item not masked is
    refused (masked items may hold -inf); the retriever's own check names the fix first
    (`retrieval.evaluate.masked_scores`).
    """
    bad = ~torch.isfinite(scores) & ~masked
    if bad.any():
        row = int(bad.any(1).nonzero()[0])
        raise PipelineError(
            f"ranking: {int(bad[row].sum())} item scores of batch row {row} are not finite (a diverged model): "
            "no metric is computed over them; fix the cause and retrain"
        )
    scores = scores.float().masked_fill(masked, float("-inf"))
    target_scores = scores.gather(1, targets[:, None])
    idx = torch.arange(scores.shape[1], device=scores.device)[None, :]
    ahead = (scores > target_scores) | ((scores == target_scores) & (idx < targets[:, None]))
    ahead &= ~masked
    return ahead.sum(1) + 1


def candidate_rank(scores: Sequence[float], candidates: Sequence[str], target: str) -> Optional[int]:
    """1-based rank of `target` among `candidates` ordered by `scores` (ties: earlier candidate
    first, i.e. the retriever's order decides); None if the target is not a candidate. A
    non-finite score is refused (`check_finite`), never ranked."""
    check_finite(scores, "ranking")
    if target not in candidates:
        return None
    t = candidates.index(target)
    s = scores[t]
    return 1 + sum(1 for i, x in enumerate(scores) if x > s or (x == s and i < t))


def coverage_weighted(subset: dict[str, float], n_covered: int, n_users: int) -> dict[str, float]:
    """Overall metrics from covered-subset metrics (paper Table 1): uncovered users score 0 at
    every k <= number of candidates, so overall = subset * n_covered / n_users."""
    w = n_covered / n_users if n_users else 0.0
    return {key: value * w for key, value in subset.items()}
