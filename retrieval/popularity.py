"""Popularity baseline: every user gets the items ranked by how often they occur in training.

Counts come from the train split only (each user's sequence minus its last two items), so
neither validation nor test targets leak into the ranking. Ties rank the lower item id first
(the shared evaluation's tie rule).
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from pipeline.config import RetrieverConfig
from pipeline.data import SplitDataset


class PopularityRetriever:
    """Retriever protocol; `n_items` sizes the score vector (dense ids 1..n_items, 0 = padding)."""

    def __init__(self, n_items: int):
        self.n_items = n_items
        self.counts = torch.zeros(n_items + 1)  # all-zero until fit: every item ties

    def fit(self, ds: SplitDataset, cfg: RetrieverConfig, seed: int, out_dir: Path, resume: bool = False) -> dict:
        """Count item occurrences over train sequences (cfg, seed, out_dir, resume: nothing to
        tune, nothing random, nothing to save; accepted for the common Retriever signature)."""
        if ds.n_items != self.n_items:
            raise ValueError(f"retriever built for {self.n_items} items, dataset has {ds.n_items}")
        t0 = time.time()
        train = [ds.train_sequence(u) for u in range(ds.n_users)]
        flat = np.fromiter((i for seq in train for i in seq), dtype=np.int64)
        counts = np.bincount(flat, minlength=self.n_items + 1)
        counts[0] = 0  # padding is never an item
        self.counts = torch.from_numpy(counts).float()
        return {
            "model": "pop",
            "train_interactions": int(flat.size),
            "items_seen": int((counts > 0).sum()),
            "train_seconds": round(time.time() - t0, 3),
        }

    def score(self, inputs: list[list[int]]) -> torch.Tensor:
        """The same train counts for every input (history masking is the evaluator's job)."""
        return self.counts.expand(len(inputs), -1).clone()
