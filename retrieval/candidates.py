"""Retriever output -> candidates rows and metrics (full catalogue and coverage), and the
per-prefix train candidates (candidates_train_prefixes.jsonl, `pipeline.candidates.write_prefix_rows`)."""
from __future__ import annotations

from typing import Optional

import torch
from tqdm.auto import tqdm

from pipeline.config import METRIC_KS
from pipeline.data import SplitDataset
from pipeline.metrics import metrics_from_ranks
from retrieval.evaluate import ScoreFn, masked_scores, rank_split, top_k_masked


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


def prefix_positions(ds: SplitDataset, u: int, last_n: Optional[int]) -> list[int]:
    """Positions t >= 1 of user u's train sequence whose prefix items[:t] is written: the last
    `last_n` (None = all; retriever.prefix_candidates)."""
    ts = list(range(1, len(ds.train_sequence(u))))
    if last_n is None:
        return ts
    return ts[-last_n:] if last_n > 0 else []


@torch.no_grad()
def retrieve_prefixes(
    score_fn: ScoreFn, ds: SplitDataset, top_k: int, last_n: Optional[int] = None, batch_size: int = 256, progress: bool = True
) -> list[dict]:
    """candidates_train_prefixes.jsonl rows (`pipeline.candidates.read_prefix_rows`), one per user: for each kept
    prefix t of the user's train sequence (`prefix_positions`), the retriever's top_k after the
    input items[:t] with that input masked (`retrieval.evaluate.top_k_masked`'s rule: ties lower item id
    first, masked items never candidates), original item ids, retriever order. Scores go through
    `score_fn` in batches of `batch_size` prefixes, so every retriever works."""
    pairs = [(u, t) for u in range(ds.n_users) for t in prefix_positions(ds, u, last_n)]
    ids = ds.item_ids
    rows = [{"user": ds.user_ids[u], "positions": [], "targets": [], "candidates": []} for u in range(ds.n_users)]
    batches = range(0, len(pairs), batch_size)
    for start in tqdm(batches, desc="rank train prefixes", disable=not progress, leave=False):
        chunk = pairs[start : start + batch_size]
        inputs = [ds.train_sequence(u)[:t] for u, t in chunk]
        items, values = top_k_masked(*masked_scores(score_fn, inputs, ds.n_items), top_k)
        for (u, t), top, vals in zip(chunk, items, values):
            row = rows[u]
            row["positions"].append(t)
            row["targets"].append(ids[ds.train_sequence(u)[t]])
            row["candidates"].append([ids[i] for i, v in zip(top, vals) if v != float("-inf")])
    return rows
