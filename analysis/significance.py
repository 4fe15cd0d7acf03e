"""Is the reranker's gain over its retriever more than user-sampling noise?

Both systems are scored on the same users, so the test is paired: per user, the difference of a
metric (reranker - retriever), resampled over users. Two scopes (SPEC.md):
- "subset": the covered users (target among the 20 candidates), paper Table 3;
- "overall": all test users; an uncovered user scores 0 for both systems at every k <= 20, so its
  difference is exactly 0, and the mean difference equals Table 1's (reranker - retriever).

Paired bootstrap (percentile 95% interval; p-value from the bootstrap distribution shifted to the
null of no difference), seeded and vectorised; plus a paired t-test where scipy is installed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from pipeline.errors import PipelineError
from pipeline.metrics import candidate_rank, per_user_metrics

N_RESAMPLES = 10_000  # bootstrap resamples: the 2.5%/97.5% quantiles are stable to ~3 digits
SEED = 0  # the same seed gives the same resamples, so a rerun gives the same intervals
CONFIDENCE = 0.95  # two-sided interval level
# Resampled user indices held at once (resamples x users): bounds memory on large datasets
# (Beauty has ~22K users) while keeping each step one numpy operation.
_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class PairedResult:
    """Reranker vs retriever on one metric, over `n` paired users."""

    n: int
    retriever: float  # mean over users
    reranker: float
    mean_diff: float  # reranker - retriever
    ci_low: float
    ci_high: float
    excludes_zero: bool  # the interval lies strictly on one side of 0
    p_bootstrap: float
    t: Optional[float]  # paired t statistic; None without scipy or when it is undefined
    p_ttest: Optional[float]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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


def bootstrap_means(diffs: np.ndarray, n_resamples: int = N_RESAMPLES, seed: int = SEED) -> np.ndarray:
    """(n_resamples, n_metrics) means of `diffs` (users x metrics) over users drawn with
    replacement; every metric sees the same resampled users (the test is paired across metrics
    too)."""
    n = diffs.shape[0]
    rng = np.random.default_rng(seed)
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    means = []
    for start in range(0, n_resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, n_resamples - start), n))
        means.append(diffs[idx].mean(axis=1))
    return np.concatenate(means, axis=0)


def paired_tests(
    retriever: Mapping[str, np.ndarray],
    reranker: Mapping[str, np.ndarray],
    metrics: Sequence[str],
    n_resamples: int = N_RESAMPLES,
    seed: int = SEED,
    confidence: float = CONFIDENCE,
) -> dict[str, PairedResult]:
    """Paired bootstrap (and t-test) of reranker - retriever for each of `metrics`."""
    if n_resamples < 1:
        raise PipelineError(f"--resamples must be >= 1 (got {n_resamples})")
    if not 0.0 < confidence < 1.0:
        raise PipelineError(f"confidence must be in (0, 1) (got {confidence})")
    n = len(retriever[metrics[0]])
    if n == 0:
        raise PipelineError("no users to compare: the split has no (covered) test users")
    a = np.stack([retriever[m] for m in metrics], axis=1)
    b = np.stack([reranker[m] for m in metrics], axis=1)
    d = b - a
    boot = bootstrap_means(d, n_resamples, seed)
    observed = d.mean(axis=0)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(boot, [tail, 1.0 - tail], axis=0)
    # Shifted to the null (mean difference 0): how often a resample strays from the observed mean
    # by at least as much as the observed mean strays from 0. +1/+1 keeps p > 0 with finite draws.
    extreme = np.abs(boot - observed) >= np.abs(observed) - 1e-12
    p_boot = (1.0 + extreme.sum(axis=0)) / (1.0 + n_resamples)
    out = {}
    for j, m in enumerate(metrics):
        t, p_t = _paired_ttest(d[:, j])
        out[m] = PairedResult(
            n=n,
            retriever=float(a[:, j].mean()),
            reranker=float(b[:, j].mean()),
            mean_diff=float(observed[j]),
            ci_low=float(low[j]),
            ci_high=float(high[j]),
            excludes_zero=bool(low[j] > 0.0 or high[j] < 0.0),
            p_bootstrap=float(p_boot[j]),
            t=t,
            p_ttest=p_t,
        )
    return out


def _paired_ttest(d: np.ndarray) -> tuple[Optional[float], Optional[float]]:
    """(t, two-sided p) of a paired t-test on differences `d`; (None, None) without scipy, or when
    the differences do not vary (t is then undefined)."""
    try:
        from scipy import stats
    except ImportError:
        return None, None
    if len(d) < 2 or np.all(d == d[0]):
        return None, None
    res = stats.ttest_1samp(d, 0.0)
    t, p = float(res.statistic), float(res.pvalue)
    return (t, p) if math.isfinite(t) and math.isfinite(p) else (None, None)
