"""Full-catalogue evaluation and top-k candidates, shared by every retriever.

The user's input history (and the padding id 0) is masked before ranking: a retriever is never
credited for, nor lets a candidate slot go to, an item the user already has.
"""
from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from pipeline.config import METRIC_KS
from pipeline.data import SplitDataset
from pipeline.errors import PipelineError
from pipeline.metrics import full_catalogue_ranks, metrics_from_ranks

ScoreFn = Callable[[list[list[int]]], torch.Tensor]


def history_mask(inputs: list[list[int]], n_items: int) -> torch.Tensor:
    """(B, n_items+1) bool: True for padding and every item in each user's input history."""
    mask = torch.zeros(len(inputs), n_items + 1, dtype=torch.bool)
    mask[:, 0] = True
    for b, seq in enumerate(inputs):
        mask[b, torch.as_tensor(seq, dtype=torch.long)] = True
    return mask


@torch.no_grad()
def masked_scores(score_fn: ScoreFn, inputs: list[list[int]], n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, mask) of one batch: `score_fn(inputs)` as float on the CPU, shape and finiteness
    checked, and `history_mask(inputs)` (padding and each input's own items)."""
    scores = score_fn(inputs).float().cpu()
    if scores.shape != (len(inputs), n_items + 1):
        raise RuntimeError(f"retriever returned scores of shape {tuple(scores.shape)}, expected {(len(inputs), n_items + 1)}")
    mask = history_mask(inputs, n_items)
    if (~torch.isfinite(scores) & ~mask).any():  # NaN compares false: every target would rank first
        raise PipelineError(
            "the retriever's scores are not finite (the model diverged, e.g. too high a learning rate): "
            "lower retriever.lr or retriever.grad_clip and retrain"
        )
    return scores, mask


def top_k_masked(scores: torch.Tensor, mask: torch.Tensor, top_k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's top_k dense item ids and their scores, masked items at -inf, in retriever order
    (ties: lower item id first, as the ranks break them). Rows with fewer than top_k unmasked items
    end in masked ones (score -inf): callers drop those."""
    masked = scores.masked_fill(mask, float("-inf"))
    # stable descending sort: equal scores keep ascending item id order, as the ranks do
    order = torch.sort(masked, dim=1, descending=True, stable=True).indices[:, :top_k]
    return order.tolist(), masked.gather(1, order).tolist()


@torch.no_grad()
def rank_split(
    score_fn: ScoreFn,
    ds: SplitDataset,
    split: str,
    top_k: int = 0,
    batch_size: int = 256,
    users: list[int] | None = None,
    progress: bool = False,
):
    """Score `split` for `users` (default all). Returns (ranks, topk_items, topk_scores):
    1-based full-catalogue target ranks (history masked), and when top_k > 0 each user's
    top_k dense item ids and their scores in retriever order (ties: lower item id first)."""
    inputs_all, targets_all = ds.inputs(split), ds.targets(split)
    users = list(range(ds.n_users)) if users is None else users
    ranks, top_items, top_scores = [], [], []
    batches = range(0, len(users), batch_size)
    for start in tqdm(batches, desc=f"rank {split}", disable=not progress, leave=False):
        idx = users[start:start + batch_size]
        inputs = [inputs_all[u] for u in idx]
        targets = torch.tensor([targets_all[u] for u in idx])
        scores, mask = masked_scores(score_fn, inputs, ds.n_items)
        ranks.extend(full_catalogue_ranks(scores, targets, mask).tolist())
        if top_k:
            items, values = top_k_masked(scores, mask, top_k)
            top_items.extend(items)
            top_scores.extend(values)
    return ranks, top_items, top_scores


def evaluate(score_fn: ScoreFn, ds: SplitDataset, split: str, ks=METRIC_KS, batch_size: int = 256) -> dict[str, float]:
    """Full-catalogue Recall/NDCG/MRR@k of `score_fn` on `split` over all users."""
    ranks, _, _ = rank_split(score_fn, ds, split, batch_size=batch_size)
    return metrics_from_ranks(ranks, ks)
