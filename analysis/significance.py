"""Is the reranker's gain over its retriever more than user-sampling noise?

Both systems are scored on the same users, so the test is paired: per user, the difference of a
metric (reranker - retriever), resampled over users. Two scopes (SPEC.md):
- "subset": the covered users (target among the 20 candidates), paper Table 3;
- "overall": all test users; an uncovered user scores 0 for both systems at every k <= 20, so its
  difference is exactly 0, and the mean difference equals Table 1's (reranker - retriever).

The paired bootstrap itself (and the t-test) lives in pipeline/significance.py, the one
implementation the reranker run's metrics.json uses too; it is re-exported here.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics import candidate_rank, per_user_metrics
from pipeline.significance import CONFIDENCE, N_RESAMPLES, SEED, PairedResult, bootstrap_means, paired_tests

__all__ = ["CONFIDENCE", "N_RESAMPLES", "SEED", "PairedResult", "bootstrap_means", "paired_tests", "paired_user_values"]


def paired_user_values(
    rankings: Sequence[Mapping[str, Any]], n_users: int, ks: Sequence[int]
) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """Per-user metric values of retriever and reranker, for both scopes.

    `rankings`: the covered users' rankings rows (candidates in retriever order, reranker scores);
    `n_users`: all test users, so overall adds n_users - len(rankings) users scoring 0 for both.
    Returns {scope: {"retriever" | "reranker": {metric: values}}}."""
    n_covered = len(rankings)
    if n_users < n_covered:
        raise PipelineError(f"{n_covered} ranked users but only {n_users} test users: the rankings belong to another run")
    retriever_ranks, reranker_ranks = [], []
    for row in rankings:
        if row["target"] not in row["candidates"]:
            raise PipelineError(f"user {row['user']!r} is ranked but its target is not a candidate: regenerate the rankings")
        retriever_ranks.append(row["candidates"].index(row["target"]) + 1)
        reranker_ranks.append(candidate_rank(row["scores"], row["candidates"], row["target"]))
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {"subset": {}, "overall": {}}
    for system, ranks in (("retriever", retriever_ranks), ("reranker", reranker_ranks)):
        values = {m: np.asarray(v, dtype=np.float64) for m, v in per_user_metrics(ranks, ks).items()}
        out["subset"][system] = values
        pad = np.zeros(n_users - n_covered)
        out["overall"][system] = {m: np.concatenate([v, pad]) for m, v in values.items()}
    return out
