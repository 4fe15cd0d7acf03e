"""A split's metrics.json section (`split_metrics`); every number comes from `pipeline.metrics`:
- `subset`: the reranker on the covered users (paper Table 3, right);
- `overall`: coverage-weighted, subset * n_covered / n_users (paper Table 1): for k <= the
  candidate count an uncovered user scores 0 whatever the order;
- `retriever_subset`: the retriever's order on the covered users (paper Table 3, left);
- `retriever`: the retriever's order over all users, ranks within its candidates. For k <= the
  candidate count this equals the full-catalogue metric; the caller may put the retriever run's
  own metrics.json section (full catalogue, also k = 50) in its place.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

from pipeline.candidates import is_covered
from pipeline.errors import PipelineError
from pipeline.metrics import candidate_rank, coverage_weighted, metrics_from_ranks

# Cut-offs reported for the reranker: at most the 20 candidates it orders (k = 50 would equal 20).
RERANK_KS = (1, 5, 10, 20)


def split_metrics(
    rows: Sequence[Mapping[str, Any]], rankings: Sequence[Mapping[str, Any]], ks: Sequence[int] = RERANK_KS
) -> dict[str, Any]:
    """The metrics.json section of one split from ALL users' candidates rows (retriever order) and
    the covered users' rankings rows (reranker scores), matched by user."""
    n_users = len(rows)
    if n_users == 0:
        raise PipelineError("no users in the candidates file: regenerate it with the retriever")
    by_user: dict[str, Mapping[str, Any]] = {}
    for rk in rankings:
        if rk["user"] in by_user:
            raise PipelineError(f"user {rk['user']!r} is ranked twice: rank each split's candidates file once")
        by_user[rk["user"]] = rk
    covered = [row for row in rows if is_covered(row)]
    missing = [row["user"] for row in covered if row["user"] not in by_user]
    if missing or len(by_user) != len(covered):
        raise PipelineError(
            f"the rankings do not match the covered users ({len(by_user)} ranked, {len(covered)} covered"
            f"{', e.g. user ' + repr(missing[0]) + ' unranked' if missing else ''}): rank the same candidates file"
        )
    reranked = [_ranked(by_user[row["user"]], row) for row in covered]
    subset = metrics_from_ranks(reranked, ks)
    return {
        "retriever": metrics_from_ranks([_retriever_rank(row) for row in rows], ks),
        "retriever_subset": metrics_from_ranks([_retriever_rank(row) for row in covered], ks),
        "subset": subset,
        "overall": coverage_weighted(subset, len(covered), n_users),
        "coverage": len(covered) / n_users,
        "n_users": n_users,
        "n_covered": len(covered),
    }


def _retriever_rank(row: Mapping[str, Any]) -> Optional[int]:
    """The target's 1-based position in retriever order (the candidates are stored in it)."""
    return row["candidates"].index(row["target"]) + 1 if is_covered(row) else None


def _ranked(rk: Mapping[str, Any], row: Mapping[str, Any]) -> Optional[int]:
    if list(rk["candidates"]) != list(row["candidates"]) or rk["target"] != row["target"]:
        raise PipelineError(f"user {row['user']!r}: rankings and candidates disagree: rank the same candidates file")
    return candidate_rank(rk["scores"], rk["candidates"], rk["target"])
