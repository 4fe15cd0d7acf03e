"""The run's own evidence plots."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from pipeline.data import SPLITS
from pipeline.errors import PipelineError
from pipeline.plotting import new_figure, save_png
from pipeline.run_files import TRAIN_SUMMARY


def write_plots(run_dir: Path, metrics: Mapping[str, Any]) -> list[Path]:
    """The run's evidence as PNGs (drawn with `pipeline.plotting`): top1_slots_<split>.png, the LLM-alone top-1
    slot histogram, and train_curves.png from train_summary.json when the run trained."""

    out = []
    for split in SPLITS:
        if split in metrics and "llm_top1_slots" in metrics[split]:
            out.append(plot_top1_slots(metrics[split], run_dir / f"top1_slots_{split}.png", title=f"{run_dir.name}: {split}"))
    if (run_dir / TRAIN_SUMMARY).is_file():
        out.append(plot_train_summary(run_dir / TRAIN_SUMMARY, run_dir / "train_curves.png", title=run_dir.name))
    return out


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


OVERFIT_STYLE = {"redrawn": "tab:blue", "fixed": "tab:orange"}  # candidate orders re-drawn / fixed


def overfit_figure(result: Mapping[str, Any], title: str = "") -> Figure:
    """overfit.json as two panels per epoch: training loss (ln K dotted: a uniform answer) and
    top-1 accuracy on the training prompts in fresh orders (chance dotted, the item-only score's
    top-1 dashed), one line per mode."""
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
    if result.get("item_only_top1") is not None:  # absent from checks written before it, null when unsolved
        top1_ax.axhline(result["item_only_top1"], color="0.3", lw=1, ls="--", label="item-only score")
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
