"""PNG plots of run directories: metrics per k, position bias, training/validation curves, every
retriever seed's curves side by side (`retriever_curves_figure`, for reproduce_tables.py), and the
evidence a reranker run writes into its own directory (rerank/run.py `write_plots`):
top1_slots_<split>.png (`plot_top1_slots`) and train_curves.png (`plot_train_summary`).

Every figure is a `matplotlib.figure.Figure` drawn on the Agg canvas directly (no pyplot), so
importing this module changes no global matplotlib state (a notebook's backend stays as it is)
and works on machines without a display. `*_figure` functions build a figure; `plot_*` functions
write it as a PNG, atomically. The analyses never write into the run directories they read; only a
reranker run writes its own two evidence plots.

Training curves come from the TensorBoard event files a run holds: `tensorboard/` (the reranker's
Trainer: train/loss per logging step, eval/<metric> per validation) and `tb/` (the retriever:
train/loss and val/<metric> per epoch). Without event files they fall back to the JSON summaries
(train_summary.json validations, retriever_summary.json history).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from matplotlib.figure import Figure

from pipeline.errors import PipelineError
from pipeline.plotting import new_figure, save_png
from pipeline.run_files import METRICS_JSON, RERANKER_TENSORBOARD, RETRIEVER_SUMMARY, RETRIEVER_TENSORBOARD
from retrieval.stopping import EARLY_STOP_METRIC

METRICS = ("NDCG", "Recall", "MRR")
# metrics.json entry -> (legend name, colour, line style): retriever grey, reranker blue;
# solid = all users (paper Table 1), dashed = covered subset (paper Table 3).
SERIES = {
    "retriever": ("retriever (all users)", "0.45", "-"),
    "overall": ("reranker (all users)", "tab:blue", "-"),
    "retriever_subset": ("retriever (covered)", "0.45", "--"),
    "subset": ("reranker (covered)", "tab:blue", "--"),
}
CONDITION_STYLE = {"retriever_order": "tab:red", "shuffled": "tab:orange", "averaged": "tab:green"}
# Validation metrics drawn in the training-curve panels (all of them stay in the event files).
CURVE_METRICS = ("NDCG@10", "Recall@10", "MRR@10")


# ----------------------------------------------------------------------------------------
# Metrics per k (metrics.json)


def _ks(section: Mapping[str, float], metric: str) -> list[int]:
    return sorted(int(key.split("@")[1]) for key in section if key.startswith(f"{metric}@"))


def metrics_per_k_figure(metrics: Mapping[str, Any], title: str = "") -> Figure:
    """One row per split of metrics.json, one column per metric (NDCG, Recall, MRR), k on the x
    axis; retriever vs reranker over all users (solid) and on the covered subset (dashed)."""
    splits = [s for s, sec in metrics.items() if isinstance(sec, dict) and any(key in sec for key in SERIES)]
    if not splits:
        raise PipelineError("metrics.json has no split with retriever or reranker metrics: pass a finished run's metrics.json")
    fig = new_figure(11, 3.2 * len(splits) + 0.4)
    axes = fig.subplots(len(splits), len(METRICS), squeeze=False)
    for row, split in enumerate(splits):
        sec = metrics[split]
        for col, metric in enumerate(METRICS):
            ax = axes[row][col]
            ks_seen: set[int] = set()
            for key, (name, colour, style) in SERIES.items():
                if key not in sec:
                    continue
                ks = _ks(sec[key], metric)
                ks_seen.update(ks)
                ax.plot(ks, [sec[key][f"{metric}@{k}"] for k in ks], style, color=colour, marker="o", ms=4, label=name)
            ax.set_xscale("log")
            ax.set_xticks(sorted(ks_seen), [str(k) for k in sorted(ks_seen)])
            ax.minorticks_off()
            ax.set_xlabel("k")
            ax.set_title(f"{split}: {metric}@k" + (f" (coverage {sec['coverage']:.2f})" if "coverage" in sec and col == 0 else ""))
            ax.grid(alpha=0.3)
        axes[row][0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig


def read_metrics(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / METRICS_JSON
    if not path.is_file():
        raise PipelineError(f"{path} not found: pass a finished run directory (train_retriever.py, train_reranker.py, run_experiment.py)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        raise PipelineError(f"{path} is not valid JSON: re-run the run that wrote it") from None


def plot_metrics_per_k(run_dir: str | Path, path: str | Path, title: Optional[str] = None) -> Path:
    """metrics_per_k.png of a run directory's metrics.json."""
    return save_png(metrics_per_k_figure(read_metrics(run_dir), Path(run_dir).name if title is None else title), path)


# ----------------------------------------------------------------------------------------
# Position bias (analysis/position_bias.py result)


def position_bias_figure(result: Mapping[str, Any], title: str = "Position bias") -> Figure:
    """Top: top-1 accuracy by the ground truth's slot per condition (bars with a dot on top; slots no
    target sat in have neither). Bottom: share of top-1 picks per slot, with the share of targets
    per slot in retriever order for reference (a perfect model's picks follow it)."""
    conds = result["conditions"]
    labels = result["labels"]
    x = list(range(len(labels)))
    width = 0.8 / len(conds)
    fig = new_figure(11, 6.5)
    top, bottom = fig.subplots(2, 1, sharex=True)
    for i, (c, sec) in enumerate(conds.items()):
        shift = (i - (len(conds) - 1) / 2) * width
        acc = [float("nan") if s["accuracy"] is None else s["accuracy"] for s in sec["slots"]]
        colour = CONDITION_STYLE.get(c)
        r1 = sec["overall"].get("Recall@1", float("nan"))
        xs = [v + shift for v in x]
        top.bar(xs, acc, width, color=colour, label=f"{sec['description']} (overall {r1:.3f})")
        top.plot(xs, acc, "o", ms=3, color=colour)  # a dot, so an accuracy of 0 is seen apart from "no target here"
        bottom.bar(xs, [s["pick_share"] for s in sec["slots"]], width, color=colour, label=sec["description"])
    n = result["n_users"]
    targets = [s["n"] / n for s in conds["retriever_order"]["slots"]]
    bottom.plot(x, targets, "k_", ms=14, mew=2, label="share of targets in slot (retriever order)")
    top.set_ylabel("top-1 accuracy")
    top.set_ylim(0, 1.05)
    top.set_title(f"{title}: {n} users, {result['permutations']} orders; accuracy by the ground truth's slot")
    top.legend(fontsize=8)
    bottom.set_ylabel("share of top-1 picks")
    bottom.set_xlabel("slot")
    bottom.set_xticks(x, labels)
    bottom.legend(fontsize=8)
    for ax in (top, bottom):
        ax.grid(alpha=0.3, axis="y")
    return fig


def plot_position_bias(result: Mapping[str, Any], path: str | Path, title: str = "Position bias") -> Path:
    return save_png(position_bias_figure(result, title), path)


# ----------------------------------------------------------------------------------------
# Training / validation curves

Series = list[tuple[float, float]]  # (step or epoch, value)


def _event_files(log_dir: Path) -> list[Path]:
    """Event files under `log_dir` (sub-folders too), oldest first (the name holds the creation time)."""

    def created(p: Path) -> tuple[int, str]:
        m = re.search(r"tfevents\.(\d+)", p.name)
        return (int(m.group(1)) if m else 0, str(p))

    return sorted(log_dir.rglob("events.out.tfevents.*"), key=created)


def read_scalars(log_dir: str | Path) -> dict[str, Series]:
    """Every scalar tag in the TensorBoard event files under `log_dir`: tag -> [(step, value)],
    sorted by step. A step logged twice (a resumed run) keeps the later file's value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    merged: dict[str, dict[int, float]] = {}
    for path in _event_files(Path(log_dir)):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})  # 0 = keep every point
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            series = merged.setdefault(tag, {})
            for ev in acc.Scalars(tag):
                series[ev.step] = ev.value
    return {tag: sorted(points.items()) for tag, points in merged.items()}


def _curves_from_events(scalars: Mapping[str, Series], eval_prefix: str, x_label: str) -> dict[str, Any]:
    evals = {tag[len(eval_prefix) :]: pts for tag, pts in scalars.items() if tag.startswith(eval_prefix)}
    return {"source": "tensorboard", "x": x_label, "loss": list(scalars.get("train/loss", [])), "eval": evals}


def training_curves(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """A run's curves per stage ("reranker", "retriever", whichever it has): {"source":
    "tensorboard" or the JSON file read, "x": "step" | "epoch", "loss": [(x, train loss)],
    "eval": {metric: [(x, validation value)]}}."""
    run = Path(run_dir)
    out: dict[str, dict[str, Any]] = {}
    if _event_files(run / RERANKER_TENSORBOARD):
        out["reranker"] = _curves_from_events(read_scalars(run / RERANKER_TENSORBOARD), "eval/", "optimizer step")
    elif (run / "train_summary.json").is_file():
        summary = json.loads((run / "train_summary.json").read_text(encoding="utf-8"))
        vals = summary.get("validations") or []
        metrics = sorted({k for v in vals for k in v if k != "step"})
        out["reranker"] = {
            "source": "train_summary.json",  # per-step losses are only in the event files
            "x": "optimizer step",
            "loss": [],
            "eval": {m: [(v["step"], v[m]) for v in vals if m in v] for m in metrics},
        }
    if _event_files(run / RETRIEVER_TENSORBOARD):
        out["retriever"] = _curves_from_events(read_scalars(run / RETRIEVER_TENSORBOARD), "val/", "epoch")
    elif (run / RETRIEVER_SUMMARY).is_file():
        hist = json.loads((run / RETRIEVER_SUMMARY).read_text(encoding="utf-8")).get("history") or []
        metrics = sorted({k for h in hist for k in h if "@" in k})
        out["retriever"] = {
            "source": "retriever_summary.json",
            "x": "epoch",
            "loss": [(h["epoch"], h["loss"]) for h in hist if "loss" in h],
            "eval": {m: [(h["epoch"], h[m]) for h in hist if m in h] for m in metrics},
        }
    if not out:
        raise PipelineError(
            f"{run} has no training logs ({RERANKER_TENSORBOARD}/, {RETRIEVER_TENSORBOARD}/, train_summary.json or "
            "retriever_summary.json): pass a run directory a training script wrote"
        )
    return out


def training_curves_figure(curves: Mapping[str, Mapping[str, Any]], title: str = "", metrics: Sequence[str] = CURVE_METRICS) -> Figure:
    """One row per stage: training loss (left) and validation metrics (right)."""
    fig = new_figure(11, 3.2 * len(curves) + 0.4)
    axes = fig.subplots(len(curves), 2, squeeze=False)
    for row, (stage, cur) in enumerate(curves.items()):
        loss_ax, eval_ax = axes[row]
        if cur["loss"]:
            xs, ys = zip(*cur["loss"])
            loss_ax.plot(xs, ys, marker="o", ms=3, color="tab:purple")
        else:
            loss_ax.text(0.5, 0.5, f"no per-step loss in {cur['source']}", ha="center", va="center", transform=loss_ax.transAxes)
        loss_ax.set_title(f"{stage}: training loss ({cur['source']})")
        loss_ax.set_xlabel(cur["x"])
        # A stage that logs a few metrics (the retriever) shows them all; the reranker's nine, a chosen few.
        shown = sorted(cur["eval"]) if len(cur["eval"]) <= 3 else [m for m in metrics if m in cur["eval"]]
        for m in shown:
            xs, ys = zip(*cur["eval"][m]) if cur["eval"][m] else ((), ())
            eval_ax.plot(xs, ys, marker="o", ms=3, label=m)
        if shown:
            eval_ax.legend(fontsize=8)
        else:
            eval_ax.text(0.5, 0.5, "no validation logged", ha="center", va="center", transform=eval_ax.transAxes)
        eval_ax.set_title(f"{stage}: validation")
        eval_ax.set_xlabel(cur["x"])
        for ax in (loss_ax, eval_ax):
            ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def plot_training_curves(run_dir: str | Path, path: str | Path, title: Optional[str] = None) -> Path:
    """training_curves.png of a run directory (reranker and/or retriever rows)."""
    curves = training_curves(run_dir)
    return save_png(training_curves_figure(curves, Path(run_dir).name if title is None else title), path)


def plot_run(run_dir: str | Path, out_dir: str | Path) -> list[Path]:
    """metrics_per_k.png and training_curves.png of one run into `out_dir`."""
    out = Path(out_dir)
    return [plot_metrics_per_k(run_dir, out / "metrics_per_k.png"), plot_training_curves(run_dir, out / "training_curves.png")]


# ----------------------------------------------------------------------------------------
# Retriever seed runs side by side (reproduce_tables.py): the curves behind the convergence table


def retriever_curves_figure(runs: Sequence[tuple[str, Path, Mapping[str, Any]]], title: str = "") -> Figure:
    """One column per retriever method: validation NDCG@10 (top) and training loss (bottom) per epoch,
    one line per seed run, the kept epoch starred. `runs`: (method, run path, retriever_summary.json)."""
    methods = list(dict.fromkeys(label for label, _, _ in runs))
    fig = new_figure(max(3.6 * len(methods) + 0.4, 6.0), 6.4)
    axes = fig.subplots(2, max(len(methods), 1), squeeze=False)
    for col, method in enumerate(methods):
        val_ax, loss_ax = axes[0][col], axes[1][col]
        for label, path, summary in runs:
            if label != method:
                continue
            hist = summary.get("history", [])
            curve = [(h["epoch"], h[EARLY_STOP_METRIC]) for h in hist if EARLY_STOP_METRIC in h]
            line, = val_ax.plot([e for e, _ in curve], [v for _, v in curve], lw=1, label=path.name)
            kept = [(e, v) for e, v in curve if e == summary["best_epoch"]]
            if kept:
                val_ax.plot([kept[0][0]], [kept[0][1]], marker="*", ms=11, color=line.get_color())
            loss_ax.plot([h["epoch"] for h in hist if "loss" in h], [h["loss"] for h in hist if "loss" in h], lw=1,
                         color=line.get_color())
        val_ax.set_title(f"{method}: validation {EARLY_STOP_METRIC}")
        val_ax.legend(fontsize=7)
        loss_ax.set_title(f"{method}: training loss")
        loss_ax.set_xlabel("epoch")
        for ax in (val_ax, loss_ax):
            ax.grid(alpha=0.3)
    if not methods:
        axes[0][0].text(0.5, 0.5, "no retriever run with a training curve", ha="center", va="center",
                        transform=axes[0][0].transAxes)
    if title:
        fig.suptitle(title + " (star: the epoch whose weights are kept)")
    return fig


# ----------------------------------------------------------------------------------------
# A reranker run's own evidence (rerank/run.py writes these into its run directory)


# ----------------------------------------------------------------------------------------
# The learnability check (rerank/overfit.py)


