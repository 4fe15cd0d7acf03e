"""Paired bootstrap over users: is one system's metric different from another's on the same users?

Both systems are scored on the same users, so the test is paired: per user, the difference of a
metric (system b - system a), resampled over users with replacement. Percentile 95% interval;
p-value from the bootstrap distribution shifted to the null of no difference; seeded and
vectorised; plus a paired t-test where scipy is installed.

The one implementation: the reranker run's metrics.json (`rerank.evaluation.evidence.bootstrap_vs_retriever`, reranker vs
retriever order) and the paper tables (the `analysis` package) both call it.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from pipeline.errors import PipelineError

N_RESAMPLES = 10_000  # bootstrap resamples: the 2.5%/97.5% quantiles are stable to ~3 digits
SEED = 0  # the same seed gives the same resamples, so a rerun gives the same intervals
CONFIDENCE = 0.95  # two-sided interval level
# Resampled user indices held at once (resamples x users): bounds memory on large datasets
# (Beauty has ~22K users) while keeping each step one numpy operation.
_CHUNK_ELEMENTS = 2_000_000


@dataclass(frozen=True)
class PairedResult:
    """Reranker vs retriever (system b vs system a) on one metric, over `n` paired users."""

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
    """Paired bootstrap (and t-test) of reranker - retriever for each of `metrics`; the values are
    per-user arrays in the same user order (`pipeline.metrics.per_user_metrics`)."""
    if n_resamples < 1:
        raise PipelineError(f"--resamples must be >= 1 (got {n_resamples})")
    if not 0.0 < confidence < 1.0:
        raise PipelineError(f"confidence must be in (0, 1) (got {confidence})")
    n = len(retriever[metrics[0]])
    if n == 0:
        raise PipelineError("no users to compare: the split has no (covered) test users")
    a = np.stack([np.asarray(retriever[m], dtype=np.float64) for m in metrics], axis=1)
    b = np.stack([np.asarray(reranker[m], dtype=np.float64) for m in metrics], axis=1)
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
