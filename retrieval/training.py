"""The training loop every neural retriever shares (LRURec and the RecBole model classes).

A model plugs in through `TrainableRetriever`: it turns train sequences into batches, computes a
loss on a batch, and scores the full catalogue. The loop does the rest, the same for all:
AdamW, gradient clipping, validation NDCG@10 every `eval_every` epochs, early stopping after
`patience` evaluations without improvement, the best weights kept (in memory and as
`retriever.pt`), TensorBoard logs under `out_dir/tb`.
"""
from __future__ import annotations

import copy
import random
import time
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from pipeline.atomic import atomic_open
from pipeline.config import RetrieverConfig
from pipeline.data import SplitDataset
from retrieval.evaluate import evaluate

EARLY_STOP_METRIC = "NDCG@10"  # validation metric for early stopping (paper)


class TrainableRetriever(Protocol):
    module: nn.Module  # the parameters to optimise

    def batches(self, train_seqs: list[list[int]], batch_size: int, rng: np.random.Generator) -> Iterable[Any]:
        """One epoch of training batches (shuffled with `rng`), already on the model's device."""
        ...

    def loss(self, batch: Any) -> torch.Tensor:
        ...

    def score(self, inputs: list[list[int]]) -> torch.Tensor:
        """(B, n_items + 1) next-item scores; must run in eval mode without gradients."""
        ...


def seed_everything(seed: int) -> np.random.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


def fit(model: TrainableRetriever, ds: SplitDataset, cfg: RetrieverConfig, seed: int, out_dir: Path) -> dict:
    """Train with early stopping on validation NDCG@10; leaves the best weights loaded."""
    from torch.utils.tensorboard import SummaryWriter

    rng = seed_everything(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # retriever.pt is saved here
    writer = SummaryWriter(str(out_dir / "tb"))
    opt = torch.optim.AdamW(model.module.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    train_seqs = [ds.train_sequence(u) for u in range(ds.n_users)]

    def val_score(inputs):
        model.module.eval()
        with torch.no_grad():
            return model.score(inputs)

    best, best_epoch, best_state, bad, step = -1.0, 0, None, 0, 0
    history = []
    t0 = time.time()
    epochs = tqdm(range(1, cfg.max_epochs + 1), desc="retriever epochs")
    for epoch in epochs:
        model.module.train()
        total, n = 0.0, 0
        for batch in model.batches(train_seqs, cfg.batch_size, rng):
            loss = model.loss(batch)
            if not torch.isfinite(loss):  # NaN weights would score every target first (NaN ties)
                raise RuntimeError(f"retriever training loss is {loss.item()} at epoch {epoch}, step {step + 1}")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.module.parameters(), cfg.grad_clip)
            opt.step()
            total, n, step = total + loss.item(), n + 1, step + 1
        writer.add_scalar("train/loss", total / max(n, 1), epoch)
        if epoch % cfg.eval_every:
            continue
        val = evaluate(val_score, ds, "val", ks=(10, 20))
        writer.add_scalar("val/NDCG@10", val["NDCG@10"], epoch)
        writer.add_scalar("val/Recall@20", val["Recall@20"], epoch)
        history.append({"epoch": epoch, "loss": total / max(n, 1), **val})
        epochs.set_postfix(loss=f"{total / max(n, 1):.3f}", ndcg10=f"{val[EARLY_STOP_METRIC]:.4f}")
        if val[EARLY_STOP_METRIC] > best:
            best, best_epoch, bad = val[EARLY_STOP_METRIC], epoch, 0
            best_state = copy.deepcopy(model.module.state_dict())
            with atomic_open(out_dir / "retriever.pt", "wb") as f:  # a kill never leaves half a file
                torch.save(best_state, f)
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    writer.close()
    if best_state is not None:
        model.module.load_state_dict(best_state)
    model.module.eval()
    return {
        "epochs_run": epoch,
        "best_epoch": best_epoch,
        f"best_val_{EARLY_STOP_METRIC}": best,
        "optimizer_steps": step,
        "train_seconds": round(time.time() - t0, 1),
        "history": history,
    }
