"""PNG plots of run directories: metrics per k, position bias, training/validation curves, and the
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
import math
import re
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.atomic import atomic_open
from pipeline.errors import PipelineError

DPI = 110  # ~900 px wide figures: readable in a notebook and a markdown viewer, small files
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
RERANKER_EVENTS = "tensorboard"  # rerank/train.py TENSORBOARD_DIR
RETRIEVER_EVENTS = "tb"  # retrieval stage's TensorBoard folder


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg backend, attached to this figure only
    return fig


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as a PNG at `path` (temp file + rename)."""
    path = Path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png")
    return path


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
    path = Path(run_dir) / "metrics.json"
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
    if _event_files(run / RERANKER_EVENTS):
        out["reranker"] = _curves_from_events(read_scalars(run / RERANKER_EVENTS), "eval/", "optimizer step")
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
    if _event_files(run / RETRIEVER_EVENTS):
        out["retriever"] = _curves_from_events(read_scalars(run / RETRIEVER_EVENTS), "val/", "epoch")
    elif (run / "retriever_summary.json").is_file():
        hist = json.loads((run / "retriever_summary.json").read_text(encoding="utf-8")).get("history") or []
        metrics = sorted({k for h in hist for k in h if "@" in k})
        out["retriever"] = {
            "source": "retriever_summary.json",
            "x": "epoch",
            "loss": [(h["epoch"], h["loss"]) for h in hist if "loss" in h],
            "eval": {m: [(h["epoch"], h[m]) for h in hist if m in h] for m in metrics},
        }
    if not out:
        raise PipelineError(
            f"{run} has no training logs ({RERANKER_EVENTS}/, {RETRIEVER_EVENTS}/, train_summary.json or "
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
# A reranker run's own evidence (rerank/run.py writes these into its run directory)


def top1_slots_figure(section: Mapping[str, Any], title: str = "") -> Figure:
    """Bars: how many covered users' LLM-alone top-1 sits in each retriever slot (metrics.json
    `llm_top1_slots`), before calibration too when the section has `llm_raw_top1_slots`; ticks: the
    targets' own histogram (where a perfect reranker's top-1 would be)."""
    if "llm_top1_slots" not in section:
        raise PipelineError("the metrics section has no llm_top1_slots: pass a reranker run's metrics.json section")
    cal = section.get("calibration", {}).get("method", "none")
    series = []
    if "llm_raw_top1_slots" in section:
        series.append(("LLM raw", section["llm_raw_top1_slots"], "tab:red"))
    series.append((f"LLM ({cal})" if cal != "none" else "LLM alone", section["llm_top1_slots"], "tab:blue"))
    k = len(section["llm_top1_slots"]["counts"])
    x = list(range(k))
    width = 0.8 / len(series)
    fig = new_figure(9, 3.8)
    ax = fig.subplots()
    for i, (name, hist, colour) in enumerate(series):
        shift = (i - (len(series) - 1) / 2) * width
        share = f", max share {hist['max_share']:.2f}" if hist.get("max_share") is not None else ""
        ax.bar([v + shift for v in x], hist["counts"], width, color=colour, label=f"{name} top-1{share}")
    targets = section["llm_top1_slots"].get("target_counts")
    if targets:
        ax.plot(x, targets, "k_", ms=14, mew=2, label="targets in slot")
    ax.set_xticks(x, [str(v + 1) for v in x])
    ax.set_xlabel("slot in retriever order")
    ax.set_ylabel("users")
    ax.set_title((f"{title}: " if title else "") + f"LLM top-1 slot ({section['llm_top1_slots']['n']} covered users)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    return fig


def plot_top1_slots(section: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    return save_png(top1_slots_figure(section, title), path)


# Validation metrics train_curves.png draws, each with its shuffled-order twin (dashed) when logged.
SUMMARY_CURVE_METRICS = ("NDCG@10", "Recall@10")


def train_summary_figure(summary: Mapping[str, Any], title: str = "") -> Figure:
    """From a reranker's train_summary.json: training loss per step (`train_losses`, absent in
    older runs) and validation metrics per step (`validations`: NDCG@10, Recall@10 solid; their
    `shuffled_` versions, candidates in a shuffled order, dashed, when present); the best step marked."""
    losses = summary.get("train_losses") or []
    vals = summary.get("validations") or []
    fig = new_figure(11, 3.6)
    loss_ax, eval_ax = fig.subplots(1, 2)
    if losses:
        loss_ax.plot([d["step"] for d in losses], [d["loss"] for d in losses], marker="o", ms=3, color="tab:purple")
    else:
        loss_ax.text(0.5, 0.5, "no train_losses in train_summary.json", ha="center", va="center", transform=loss_ax.transAxes)
    loss_ax.set_title("training loss")
    loss_ax.set_xlabel("optimizer step")
    drawn = 0
    for i, metric in enumerate(SUMMARY_CURVE_METRICS):
        colour = f"C{i}"
        for key, style in ((metric, "-"), (f"shuffled_{metric}", "--")):
            pts = [(v["step"], v[key]) for v in vals if key in v]
            if pts:
                xs, ys = zip(*pts)
                eval_ax.plot(xs, ys, style, marker="o", ms=3, color=colour, label=key)
                drawn += 1
    if drawn:
        if summary.get("best_step") is not None:
            eval_ax.axvline(summary["best_step"], color="0.5", lw=1, ls=":", label=f"best step {summary['best_step']}")
        eval_ax.legend(fontsize=8)
    else:
        eval_ax.text(0.5, 0.5, "no validation logged", ha="center", va="center", transform=eval_ax.transAxes)
    eval_ax.set_title("validation")
    eval_ax.set_xlabel("optimizer step")
    for ax in (loss_ax, eval_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps are whole numbers
    if title:
        fig.suptitle(title)
    return fig


def plot_train_summary(summary_path: str | Path, path: str | Path, title: str = "") -> Path:
    """train_curves.png from a train_summary.json."""
    summary_path = Path(summary_path)
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise PipelineError(f"{summary_path} is missing or not valid JSON: train the reranker again") from None
    return save_png(train_summary_figure(summary, title), path)


# ----------------------------------------------------------------------------------------
# The learnability check (rerank/overfit.py)

OVERFIT_STYLE = {"redrawn": "tab:blue", "fixed": "tab:orange"}  # candidate orders re-drawn / fixed


def overfit_figure(result: Mapping[str, Any], title: str = "") -> Figure:
    """overfit.json as two panels per epoch: training loss (ln K dotted: a uniform answer) and
    top-1 accuracy on the training prompts in fresh orders (chance dotted), one line per mode."""
    fig = new_figure(11, 3.6)
    loss_ax, top1_ax = fig.subplots(1, 2)
    chance = result["chance"]
    for mode, colour in OVERFIT_STYLE.items():
        if mode in result:
            curve = result[mode]
            loss_ax.plot(curve["epoch"], curve["train_loss"], marker="o", ms=3, color=colour, label=mode)
            top1_ax.plot(curve["epoch"], curve["train_top1"], marker="o", ms=3, color=colour, label=mode)
    loss_ax.axhline(math.log(1 / chance), color="0.5", lw=1, ls=":", label="ln K (uniform)")
    top1_ax.axhline(chance, color="0.5", lw=1, ls=":", label="chance 1/K")
    top1_ax.set_ylim(0, 1.02)
    loss_ax.set_title(f"training loss ({result['n_prompts']} prompts)")
    top1_ax.set_title("top-1 on the training prompts, fresh orders")
    for ax in (loss_ax, top1_ax):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if title:
        fig.suptitle(title)
    return fig


def plot_overfit(result: Mapping[str, Any], path: str | Path, title: str = "") -> Path:
    """overfit.png from the check's result (overfit.json's content)."""
    return save_png(overfit_figure(result, title), path)
