"""The learnability check: can the reranker fit a handful of its own training prompts?

Before a long (GPU) run, train the run's exact recipe on N training prompts for E epochs and watch
two curves per epoch: the training loss, and the top-1 accuracy on those same N prompts scored by
the ranker (one forward pass, the run's head) with their candidates in a freshly drawn order. Run
twice from the same base model:

- "redrawn": every epoch re-draws each prompt's candidate order (reranker.reshuffle_each_epoch),
  so the only way to fit is to bind each candidate's content to its label and read it back;
- "fixed": each prompt keeps one order, so "which label for this prompt" can be memorised.

A head that fits "fixed" but stays at chance on "redrawn" optimises but cannot bind content to its
label: more data will not cure it. A head that fits "redrawn" only up to `item_only_top1` has learned
which items tend to be the answer in these prompts, not which one fits each history (see there).
The check writes overfit.json ({"redrawn": {"epoch", "train_loss", "train_top1"}, "fixed": {...},
"n_prompts", "chance", "item_only_top1"}) and overfit.png into the run directory; each mode's
training lives in <run>/<mode>/.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from transformers import TrainerCallback

from pipeline import rng_streams
from pipeline.atomic import write_json
from pipeline.config import Config
from pipeline.data import load_dataset
from pipeline.data.dataset import SplitDataset, titles_by_item
from pipeline.metrics import candidate_rank
from rerank.inference.ranker import rank_rows
from rerank.model.sources import load_from_config
from rerank.prompting.style import PromptStyle, style_from_config
from rerank.run import training_samples
from rerank.training.samples import TrainSample
from rerank.training.stages import train_reranker

RESULT_FILE = "overfit.json"
PLOT_FILE = "overfit.png"
MODES = ("redrawn", "fixed")  # re-drawn candidate orders every epoch / one order per prompt
# The item-only bound's solver budget: 32 prompts take 0.05 s, 128 about 3 s; 400 take minutes, where
# the solver's proven upper bound is reported instead of the exact maximum.
ITEM_ONLY_SECONDS = 60.0


def sample_rows(samples: Sequence[TrainSample], ds: SplitDataset, epoch: int, seed: int) -> list[dict[str, Any]]:
    """`samples` as candidates-file rows (original item ids) with each prompt's candidates in an
    order drawn for `epoch` (seeded by seed, user, position, epoch), unlike any training order."""
    rows = []
    for s in samples:
        order = np.random.default_rng([seed, s.user, s.position, epoch, rng_streams.OVERFIT_ORDERS]).permutation(len(s.candidates))
        rows.append(
            {
                "user": ds.user_ids[s.user],
                "history": [ds.item_ids[i] for i in s.history],
                "candidates": [ds.item_ids[s.candidates[i]] for i in order],
                "target": ds.item_ids[s.target],
            }
        )
    return rows


def top1_accuracy(scores: Sequence[Sequence[float]], rows: Sequence[Mapping[str, Any]]) -> float:
    """Share of rows whose target is ranked first (ties to the earlier candidate, as every metric)."""
    return sum(candidate_rank(s, r["candidates"], r["target"]) == 1 for s, r in zip(scores, rows)) / len(rows)


def item_only_top1(samples: Sequence[TrainSample]) -> Optional[float]:
    """The largest share of `samples` whose answer a history-free score can rank first: one score per
    item, the same in every prompt, chosen to rank as many answers above all their rivals as possible.
    With retriever negatives an item that is one prompt's answer is another's rival, so no such score
    gets every answer first. A head whose top-1 stalls at this level may have learned no more than
    which items tend to be the answer in these prompts; above it, its scores depend on the history.
    Solved exactly as a small mixed-integer program (scipy's HiGHS): scores s in [0, n_items], one
    binary hit z_p per prompt, and s_answer - s_rival >= 1 for every rival of a prompt with z_p = 1
    (integer scores 0..n-1 realise any ranking, so the margin 1 loses nothing). Beyond
    ITEM_ONLY_SECONDS the solver's proven upper bound stands in for the maximum; None when it proved
    none."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    if not samples:
        return None
    items = sorted({c for s in samples for c in s.candidates})
    index = {item: i for i, item in enumerate(items)}
    n, m = len(items), len(samples)
    big = n + 1  # switches a prompt's constraints off when z_p = 0 (the score gap is at least -n)
    # One constraint row per (prompt, rival): s_answer - s_rival - big * z_p >= 1 - big.
    pairs = [(p, s.target, rival) for p, s in enumerate(samples) for j, rival in enumerate(s.candidates) if j != s.target_index]
    rows = np.repeat(np.arange(len(pairs)), 3)
    cols = [c for p, answer, rival in pairs for c in (index[answer], index[rival], n + p)]
    vals = np.tile([1.0, -1.0, -float(big)], len(pairs))
    a = coo_matrix((vals, (rows, cols)), shape=(len(pairs), n + m))
    res = milp(
        c=np.r_[np.zeros(n), -np.ones(m)],  # maximise the hits
        constraints=LinearConstraint(a, lb=1.0 - big, ub=np.inf),
        integrality=np.r_[np.zeros(n), np.ones(m)],
        bounds=Bounds(np.zeros(n + m), np.r_[np.full(n, float(n)), np.ones(m)]),
        options={"time_limit": ITEM_ONLY_SECONDS},
    )
    # Solved: the exact maximum. Out of time: the solver's proven upper bound on the hits (dual bound),
    # so "no item-only score gets above it" still holds, only less tightly.
    bound = getattr(res, "mip_dual_bound", None)
    if res.status == 0:
        hits = float(np.round(res.x[n:]).sum())
    elif bound is not None and np.isfinite(bound):
        hits = math.floor(-bound + 1e-6)
    else:  # nothing proven in the time: no bound rather than a wrong one
        return None
    return round(hits / m, 6)


class CheckCallback(TrainerCallback):
    """At every epoch's end: the mean training loss of the epoch's steps and the top-1 accuracy of
    the training prompts in that epoch's check order. Needs logging every step (logging_steps=1)."""

    def __init__(self, score: Any, samples: Sequence[TrainSample], ds: SplitDataset, seed: int) -> None:
        self.score, self.samples, self.ds, self.seed = score, samples, ds, seed
        self.curve: dict[str, list[float]] = {"epoch": [], "train_loss": [], "train_top1": []}
        self._losses: list[float] = []

    def on_log(self, args: Any, state: Any, control: Any, logs: Optional[dict] = None, **kwargs: Any) -> None:
        if logs and "loss" in logs:
            self._losses.append(float(logs["loss"]))

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        epoch = len(self.curve["epoch"]) + 1
        rows = sample_rows(self.samples, self.ds, epoch, self.seed)
        top1 = top1_accuracy(self.score(model, rows), rows)
        loss = float(np.mean(self._losses)) if self._losses else float("nan")
        self._losses = []
        for key, value in (("epoch", epoch), ("train_loss", loss), ("train_top1", top1)):
            self.curve[key].append(value)
        print(f"overfit check: epoch {epoch}: train loss {loss:.4f}, top-1 {top1:.3f}", flush=True)


def check_config(cfg: Config, mode: str) -> Config:
    """The run's reranker recipe as the check trains it: N prompts, E epochs, orders re-drawn or
    fixed, a loss logged every step, no validation, calibration or fusion (the check scores its
    own training prompts)."""
    o = cfg.overfit
    reranker = dataclasses.replace(
        cfg.reranker,
        max_train_samples=o.n_prompts,
        num_epochs=float(o.epochs),
        reshuffle_each_epoch=mode == "redrawn",
        logging_steps=1,
        eval_steps=10**9,  # no checkpoint mid-run: the check keeps the last adapter
        resume=False,
    )
    return dataclasses.replace(cfg, reranker=reranker)


def run_check(cfg: Config, out: str | Path, candidates_dir: Optional[str | Path]) -> dict[str, Any]:
    """Train each mode of `cfg.overfit.modes` from the same base model and write overfit.json and
    overfit.png into `out`; `candidates_dir`: the retriever run whose candidates give retriever
    negatives (None with random negatives)."""
    out = Path(out)
    ds = load_dataset(cfg.data)
    samples = training_samples(check_config(cfg, MODES[0]), ds, candidates_dir or out)
    result: dict[str, Any] = {
        "n_prompts": len(samples), "chance": 1.0 / cfg.reranker.train_candidates, "item_only_top1": item_only_top1(samples),
    }
    if result["item_only_top1"] is None:
        print(f"overfit check: the item-only bound was not solved in {ITEM_ONLY_SECONDS:g} s (item_only_top1: null)", flush=True)
    else:
        print(f"overfit check: no item-only score (no history) gets a top-1 above {result['item_only_top1']:.3f}", flush=True)
    for mode in cfg.overfit.modes:
        mcfg = check_config(cfg, mode)
        model, tokenizer = load_from_config(mcfg.reranker)  # a fresh base model per mode
        style = style_from_config(mcfg.reranker, tokenizer)
        print(f"overfit check: {mode} orders, {len(samples)} prompts, {cfg.overfit.epochs} epochs", flush=True)
        result[mode] = check_mode(model, tokenizer, style, ds, samples, mcfg, out / mode)
        del model
    write_result(out, result)
    return result


def check_mode(
    model: Any, tokenizer: Any, style: PromptStyle, ds: SplitDataset, samples: Sequence[TrainSample], cfg: Config, out: Path
) -> dict[str, list[float]]:
    """Train `model` on `samples` with `cfg` (a `check_config`) into `out`; the per-epoch curve."""
    callback = CheckCallback(_scorer(tokenizer, style, ds, cfg), samples, ds, cfg.seed)
    train_reranker(model, tokenizer, style, ds, samples, [], cfg.reranker, out, seed=cfg.seed, callbacks=[callback])
    return callback.curve


def write_result(out: Path, result: Mapping[str, Any]) -> None:
    """overfit.json and its plot, overfit.png, into `out`."""
    write_json(out / RESULT_FILE, result)
    from rerank.evaluation.figures import plot_overfit  # matplotlib only when the check writes its plot

    plot_overfit(result, out / PLOT_FILE, title=out.name)


def _scorer(tokenizer: Any, style: PromptStyle, ds: SplitDataset, cfg: Config) -> Any:
    titles = titles_by_item(ds)

    def score(model: torch.nn.Module, rows: Sequence[Mapping[str, Any]]) -> list[list[float]]:
        return rank_rows(model, tokenizer, style, rows, titles, batch_size=cfg.reranker.rank_batch_size, progress=False)

    return score
