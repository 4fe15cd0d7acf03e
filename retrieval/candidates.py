"""Retriever output -> candidates rows and metrics (full catalogue and coverage)."""
from __future__ import annotations

from pipeline.config import METRIC_KS
from pipeline.data import SplitDataset
from pipeline.metrics import metrics_from_ranks
from retrieval.evaluate import ScoreFn, rank_split


def retrieve(score_fn: ScoreFn, ds: SplitDataset, split: str, top_k: int, batch_size: int = 256):
    """Rank `split` for every user. Returns (rows, metrics_section):
    rows: candidates-file rows (original ids; top_k by score, history masked, target not forced
    in, retriever order); metrics_section: {"retriever": full-catalogue metrics,
    "coverage", "n_users", "n_covered"}."""
    ranks, top_items, top_scores = rank_split(score_fn, ds, split, top_k=top_k, batch_size=batch_size, progress=True)
    inputs, targets = ds.inputs(split), ds.targets(split)
    ids = ds.item_ids
    rows = []
    for u in range(ds.n_users):
        # a user whose history covers nearly the catalogue can have fewer than top_k eligible
        # items: masked ones (score -inf) are never candidates
        keep = [j for j, s in enumerate(top_scores[u]) if s != float("-inf")]
        rows.append({
            "user": ds.user_ids[u],
            "history": [ids[i] for i in inputs[u]],
            "candidates": [ids[top_items[u][j]] for j in keep],
            "scores": [round(float(top_scores[u][j]), 6) for j in keep],
            "target": ids[targets[u]],
        })
    n_covered = sum(r <= top_k for r in ranks)
    section = {
        "retriever": metrics_from_ranks(ranks, METRIC_KS),
        "coverage": n_covered / ds.n_users,
        "n_users": ds.n_users,
        "n_covered": n_covered,
    }
    return rows, section
