"""The training loop every neural retriever shares (LRURec and the RecBole model classes).

A model plugs in through `TrainableRetriever`: it turns train sequences into batches, computes a
loss on a batch, and scores the full catalogue. The loop does the rest, the same for all:
the configured optimiser (`make_optimizer`), gradient clipping unless
retriever.grad_clip is null, validation NDCG@10 every `eval_every` epochs, early stopping after
`patience` evaluations without improvement of its mean over the last `smooth_window` ones, the best
single epoch of the best window kept (`retrieval.stopping`; in memory and as `retriever.pt`),
TensorBoard logs under `out_dir/tb`.

Resumable: after every epoch the loop's whole state (weights, optimizer, best weights, history,
every RNG the epoch drew from) goes to `out_dir/retriever_state.pt`, so `fit(..., resume=True)`
continues a killed run from its last finished epoch and ends exactly as the uninterrupted run
would have (tested). A baseline that needs 80 minutes on a slow machine no longer restarts from
epoch 1 when a session ends.
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
from pipeline.errors import PipelineError
from pipeline.run_files import RETRIEVER_TENSORBOARD
from retrieval.evaluate import evaluate
from retrieval.stopping import EARLY_STOP_METRIC, SmoothedStopping

STATE_FILE = "retriever_state.pt"  # the loop's state after its last finished epoch (for resume)


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


def rng_states(rng: np.random.Generator) -> dict:
    """Every RNG an epoch draws from: batching (`rng`), recbole's masking (python `random`),
    dropout and initialisation (torch), and numpy's global state for any library that uses it."""
    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
              "generator": rng.bit_generator.state}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict, rng: np.random.Generator) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    rng.bit_generator.state = states["generator"]
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def make_optimizer(params: Iterable[nn.Parameter], cfg: RetrieverConfig) -> torch.optim.Optimizer:
    """retriever.optimizer at retriever.lr with retriever.weight_decay: AdamW (decoupled decay, LRURec's
    paper setting) or Adam (decay as an L2 penalty in the gradient, recbole's)."""
    cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[cfg.optimizer]
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def fit(model: TrainableRetriever, ds: SplitDataset, cfg: RetrieverConfig, seed: int, out_dir: Path,
        resume: bool = False) -> dict:
    """Train with early stopping on validation NDCG@10; leaves the best weights loaded.
    `resume`: continue from `out_dir/retriever_state.pt` when a killed run left one (the same
    config and seed; the caller checks that), else start fresh."""
    from torch.utils.tensorboard import SummaryWriter

    rng = seed_everything(seed)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)  # retriever.pt is saved here
    opt = make_optimizer(model.module.parameters(), cfg)
    train_seqs = [ds.train_sequence(u) for u in range(ds.n_users)]
    state_path = out_dir / STATE_FILE

    def val_score(inputs):
        model.module.eval()
        with torch.no_grad():
            return model.score(inputs)

    rule = SmoothedStopping(cfg.smooth_window, cfg.patience)  # its `recent` payloads: each validation's weights
    best_epoch, best_state, step = 0, None, 0
    history, first, seconds_before, stopped = [], 1, 0.0, False
    if resume and state_path.is_file():
        # weights_only=False: the file holds python's RNG state (tuples) and numpy's (arrays);
        # it is our own file, written below, never downloaded.
        state = torch.load(state_path, map_location="cpu", weights_only=False)
        model.module.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        rule.best, rule.bad, rule.recent = state["best"], state["bad"], state.get("recent", [])
        best_epoch, best_state, step = state["best_epoch"], state["best_state"], state["step"]
        history, seconds_before, stopped = state["history"], state["train_seconds"], state["stopped"]
        first = state["epoch"] + 1
        set_rng_states(state["rng"], rng)
        print(f"retriever: resumed after epoch {state['epoch']} from {state_path}")
    # purge_step drops what a killed run logged after its last saved epoch (logged again now).
    writer = SummaryWriter(str(out_dir / RETRIEVER_TENSORBOARD), purge_step=first if first > 1 else None)
    t0 = time.time() - seconds_before

    def save_state(epoch: int) -> None:
        """The loop's state after `epoch`, atomically (a kill mid-save keeps the previous epoch's)."""
        state = {
            "epoch": epoch, "model": model.module.state_dict(), "optimizer": opt.state_dict(),
            "best": rule.best, "best_epoch": best_epoch, "best_state": best_state, "bad": rule.bad, "step": step,
            "history": history, "train_seconds": time.time() - t0, "stopped": stopped, "rng": rng_states(rng),
            "recent": rule.recent,
        }
        with atomic_open(state_path, "wb") as f:
            torch.save(state, f)

    epoch = first - 1
    epochs = tqdm(range(first, cfg.max_epochs + 1), desc="retriever epochs", initial=first - 1, total=cfg.max_epochs)
    for epoch in epochs if not stopped else ():  # stopped: a finished fit killed before its outputs
        model.module.train()
        total, n = 0.0, 0
        for batch in model.batches(train_seqs, cfg.batch_size, rng):
            loss = model.loss(batch)
            if not torch.isfinite(loss):  # NaN weights would score every target first (NaN ties)
                raise PipelineError(
                    f"retriever training loss is {loss.item()} at epoch {epoch}, step {step + 1} (the model diverged): "
                    f"lower retriever.lr (now {cfg.lr:g}) or set retriever.grad_clip (now {cfg.grad_clip})"
                )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip is not None:
                nn.utils.clip_grad_norm_(model.module.parameters(), cfg.grad_clip)
            opt.step()
            total, n, step = total + loss.item(), n + 1, step + 1
        writer.add_scalar("train/loss", total / max(n, 1), epoch)
        if epoch % cfg.eval_every:
            save_state(epoch)
            continue
        val = evaluate(val_score, ds, "val", ks=(10, 20))
        writer.add_scalar("val/NDCG@10", val["NDCG@10"], epoch)
        writer.add_scalar("val/Recall@20", val["Recall@20"], epoch)
        history.append({"epoch": epoch, "loss": total / max(n, 1), **val})
        epochs.set_postfix(loss=f"{total / max(n, 1):.3f}", ndcg10=f"{val[EARLY_STOP_METRIC]:.4f}")
        improved = rule.observe(epoch, val[EARLY_STOP_METRIC], copy.deepcopy(model.module.state_dict()))
        if improved is not None:  # the window's mean improved: keep its best single epoch
            best_epoch, _, best_state = improved
            with atomic_open(out_dir / "retriever.pt", "wb") as f:  # a kill never leaves half a file
                torch.save(best_state, f)
        stopped = rule.stopped
        save_state(epoch)
        if stopped:
            break
    writer.close()
    if best_state is not None:
        model.module.load_state_dict(best_state)
    model.module.eval()
    kept = next((h[EARLY_STOP_METRIC] for h in history if h["epoch"] == best_epoch), rule.best)
    return {
        "epochs_run": epoch,
        "best_epoch": best_epoch,
        f"best_val_{EARLY_STOP_METRIC}": kept,  # the kept epoch's own value
        f"best_smoothed_val_{EARLY_STOP_METRIC}": rule.best,  # the stopping rule's (= the above when smooth_window is 1)
        "smooth_window": cfg.smooth_window,
        "optimizer_steps": step,
        "train_seconds": round(time.time() - t0, 1),
        "history": history,
    }
