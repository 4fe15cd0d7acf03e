"""What every retriever provides: fit on the train split, score the full catalogue."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from pipeline.config import RetrieverConfig
from pipeline.data import SplitDataset


class Retriever(Protocol):
    def fit(self, ds: SplitDataset, cfg: RetrieverConfig, seed: int, out_dir: Path, resume: bool = False) -> dict:
        """Train on the train split (early stopping on validation NDCG@10, best weights kept).
        Returns a summary (epochs run, best epoch, best validation NDCG@10, seconds).
        `resume`: continue from the state a killed fit left in `out_dir`, if any."""
        ...

    def score(self, inputs: list[list[int]]) -> torch.Tensor:
        """(len(inputs), n_items + 1) scores over dense item ids for the next item after each
        input sequence (chronological, dense ids). Column 0 (padding) is ignored."""
        ...
