"""How each retriever's training ended: the evidence that Table 1 compares converged models.

One row per retriever method (its seed runs, as Table 1 groups them): epochs run, the epoch of the
best validation NDCG@10 (the weights kept) and that NDCG@10 (what selects settings: compare runs of
one method with different settings here, never on test), what ended training (early stopping's patience, or the
`max_epochs` bound: a run that hit its bound was still improving and its row is not a fair
comparison; decided by replaying the stopping rule, `retrieval.stopping`, over the run's curve), how far
the kept epoch stands above its neighbouring validations (a large margin is a one-epoch spike, which
selects noise on 943 validation users), training seconds (retriever_summary.json), wall seconds of the run (run.json start to
end, retriever-only runs that were not resumed: a run_experiment.py run also timed its reranker) and
the headline test metrics, each as mean ± sample std over the seeds. `kept_curves` gives each seed
run's validation curve around its kept epoch, the evidence behind the margin.

Everything is read from the retriever's own run directory (`Run.retriever_source`); a run without
retriever_summary.json (popularity has no epochs; older runs) shows "–" where it has no number.
"""
from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Sequence

import pandas as pd

from analysis.tables.cells import mean_std_cell, table
from analysis.tables.group import Group, mean_and_std, retriever_seeds
from analysis.tables.read import load_yaml
from pipeline.errors import PipelineError
from pipeline.run_files import CONFIG_YAML, METRICS_JSON, RETRIEVER_SUMMARY, RUN_JSON
from retrieval.stopping import EARLY_STOP_METRIC, replay

METRICS = ("NDCG@10", "Recall@20")  # issue-level headline: ranking quality and the reranker's coverage
PATIENCE, BOUND = "patience", "epoch bound"
AROUND = 2  # validations shown on each side of the kept epoch


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f"{path} is not valid JSON: rerun the run") from None


def _curve(summary: dict) -> list[tuple[int, float]]:
    return [(h["epoch"], h[EARLY_STOP_METRIC]) for h in summary.get("history", []) if EARLY_STOP_METRIC in h]


def _kept_at(curve: list[tuple[int, float]], summary: dict) -> Optional[int]:
    """The kept epoch's index in `curve` (None: not validated, or no curve)."""
    return next((i for i, (e, _) in enumerate(curve) if e == summary.get("best_epoch")), None)


def stopped_by(summary: dict, patience: int, smooth_window: int = 1) -> Optional[str]:
    """PATIENCE when the stopping rule, replayed over the run's validation curve, ends training at the
    run's last epoch; BOUND when the loop ran out of epochs first (the training loop stops on exactly
    these two); None without epochs."""
    if "epochs_run" not in summary or "best_epoch" not in summary:
        return None
    return PATIENCE if replay(_curve(summary), smooth_window, patience).stopped_at == summary["epochs_run"] else BOUND


def around_kept(summary: dict, n: int = AROUND) -> list[tuple[int, float]]:
    """The (epoch, validation NDCG@10) of the kept epoch and of up to `n` validations on each side."""
    curve = _curve(summary)
    at = _kept_at(curve, summary)
    return [] if at is None else curve[max(at - n, 0):at + n + 1]


def kept_margin(summary: dict) -> float:
    """The kept epoch's validation NDCG@10 minus the mean of the validations just before and after it
    (those that exist): near 0 on a plateau, large for a one-epoch spike; NaN without neighbours."""
    curve = _curve(summary)
    at = _kept_at(curve, summary)
    if at is None:
        return math.nan
    neighbours = [v for _, v in curve[max(at - 1, 0):at] + curve[at + 1:at + 2]]
    return curve[at][1] - sum(neighbours) / len(neighbours) if neighbours else math.nan


def wall_seconds(source: Path) -> Optional[float]:
    """run.json end - start for a finished retriever-only run that was never resumed, else None."""
    run_file, metrics_file = source / RUN_JSON, source / METRICS_JSON
    if not run_file.is_file() or not metrics_file.is_file():
        return None
    run = _read_json(run_file)
    if not run.get("end") or run.get("resumes") or any("subset" in s for s in _read_json(metrics_file).values()):
        return None
    return (datetime.fromisoformat(run["end"]) - datetime.fromisoformat(run["start"])).total_seconds()


def run_training(source: Path) -> dict[str, Any]:
    """One retriever run's training facts (NaN / None where the run has none)."""
    summary_file = source / RETRIEVER_SUMMARY
    summary = _read_json(summary_file) if summary_file.is_file() else {}
    cfg = load_yaml(source / CONFIG_YAML)
    retriever = cfg.get("retriever") or {}
    has_epochs = "epochs_run" in summary
    patience = retriever.get("patience")
    window = retriever.get("smooth_window", 1)  # runs from before the key used the raw curve
    return {
        "epochs_run": summary.get("epochs_run", math.nan),
        "best_epoch": summary.get("best_epoch", math.nan),
        "best_val_ndcg10": summary.get("best_val_NDCG@10", math.nan),
        "max_epochs": retriever.get("max_epochs") if has_epochs else None,
        "patience": patience if has_epochs else None,
        "smooth_window": window if has_epochs else None,
        "stopped_by": stopped_by(summary, patience, window) if has_epochs and isinstance(patience, int) else None,
        "kept_margin": kept_margin(summary),
        "train_seconds": summary.get("train_seconds", math.nan),
        "wall_seconds": math.nan if (wall := wall_seconds(source)) is None else wall,
    }


def finite_mean_and_std(values: Sequence[Any]) -> tuple[float, float]:
    """`mean_and_std` of the values that are numbers (None and NaN left out); NaN, NaN for none."""
    finite = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    return mean_and_std(finite) if finite else (math.nan, math.nan)


def _joined(values: Sequence[Any]) -> Optional[str]:
    distinct = sorted({v for v in values if v is not None}, key=str)
    return "/".join(map(str, distinct)) if distinct else None


def setting_labels(seeds_list: Sequence[Any]) -> list[str]:
    """Each row's method name; where one method has rows with different retriever settings (a
    sweep), followed by the settings in which those rows differ, e.g. "SASRec (dropout=0.1)"."""
    sections = [json.loads(s.runs[0].retriever_key or "{}") for s in seeds_list]
    labels = []
    for seeds, mine in zip(seeds_list, sections):
        twins = [sec for other, sec in zip(seeds_list, sections) if other.method == seeds.method]
        differ = sorted(k for k in set().union(*twins) if len({json.dumps(t.get(k), default=str) for t in twins}) > 1)
        labels.append(f"{seeds.method} ({', '.join(f'{k}={mine.get(k)}' for k in differ)})" if differ else seeds.method)
    return labels


def convergence(group: Group, split: str) -> pd.DataFrame:
    """One row per retriever method of `group`: the training facts of its
    seed runs (mean, sample std), how many stopped on patience / on the bound, and `split` metrics."""
    rows = []
    all_seeds = retriever_seeds(group)
    for seeds, label in zip(all_seeds, setting_labels(all_seeds)):
        facts = [run_training(Path(r.retriever_source)) for r in seeds.runs]
        row: dict[str, Any] = {"dataset": group.label, "split": split, "method": label,
                               "run": ";".join(str(r.path) for r in seeds.runs), "n": seeds.n}
        for key in ("epochs_run", "best_epoch", "best_val_ndcg10", "train_seconds", "wall_seconds"):
            row[key], row[f"{key} std"] = finite_mean_and_std([f[key] for f in facts])
        row["max_epochs"] = _joined([f["max_epochs"] for f in facts])
        row["patience"] = _joined([f["patience"] for f in facts])
        row["smooth_window"] = _joined([f["smooth_window"] for f in facts])
        margins = [m for m in (f["kept_margin"] for f in facts) if not math.isnan(m)]
        row["max_kept_margin"] = max(margins) if margins else math.nan  # the worst seed: is any kept epoch a spike?
        stops = [f["stopped_by"] for f in facts]
        row["stopped by patience"] = stops.count(PATIENCE)
        row["stopped by epoch bound"] = stops.count(BOUND)
        for m in METRICS:
            row[m], row[f"{m} std"] = finite_mean_and_std(seeds.values("retriever", m))
        rows.append(row)
    return pd.DataFrame(rows)


def seed_summaries(group: Group) -> list[tuple[str, Path, dict]]:
    """(method label, run path, retriever_summary.json) of every retriever seed run of `group` that
    has a training curve (popularity and older runs have none), methods in table order."""
    out = []
    all_seeds = retriever_seeds(group)
    for seeds, label in zip(all_seeds, setting_labels(all_seeds)):
        for r in seeds.runs:
            summary_file = Path(r.retriever_source) / RETRIEVER_SUMMARY
            summary = _read_json(summary_file) if summary_file.is_file() else {}
            if "best_epoch" in summary:
                out.append((label, Path(r.path), summary))
    return out


def kept_curves(group: Group, split: str) -> pd.DataFrame:
    """One row per retriever seed run of `group`: its kept epoch, the validation NDCG@10 of up to
    AROUND validations on each side of it (columns -2..+2, with their epochs), and the margin."""
    rows = []
    for label, path, summary in seed_summaries(group):
        kept = summary["best_epoch"]
        row: dict[str, Any] = {"dataset": group.label, "split": split, "method": label, "run": str(path),
                               "kept_epoch": kept, "kept_margin": kept_margin(summary)}
        around = around_kept(summary)
        at = [e for e, _ in around].index(kept) if around else 0
        for i, (epoch, value) in enumerate(around):
            row[f"epoch {i - at:+d}"], row[f"val {i - at:+d}"] = epoch, value
        rows.append(row)
    return pd.DataFrame(rows)


def kept_curves_markdown(df: pd.DataFrame, label: str) -> str:
    d = df[df["dataset"] == label] if not df.empty else df
    if d.empty:
        return ""
    offsets = range(-AROUND, AROUND + 1)

    def cell(r: dict, k: int) -> str:
        value = r.get(f"val {k:+d}")
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "–"
        return f"{value:.4f} @{int(r[f'epoch {k:+d}'])}" if k else f"**{value:.4f}** @{int(r[f'epoch {k:+d}'])}"

    rows = [[r["method"], Path(r["run"]).name, *(cell(r, k) for k in offsets), f"{r['kept_margin']:+.4f}"]
            for r in d.to_dict("records")]
    header = ["Method", "Run", *(f"{k:+d}" if k else "kept" for k in offsets), "Kept − neighbours"]
    return "\n".join([
        "### Validation NDCG@10 around each run's kept epoch", "",
        table(header, rows, text_columns=2),
        "Each cell: validation NDCG@10 @ epoch, the kept epoch in bold; Kept − neighbours: the kept value minus the mean of "
        "the validations just before and after it (a one-epoch spike stands well above both).\n",
    ])


def convergence_markdown(df: pd.DataFrame, label: str) -> str:
    d = df[df["dataset"] == label] if not df.empty else df
    if d.empty:
        return ""
    header = ["Method", "n", "Epochs run", "Best epoch", "Best val NDCG@10", "max_epochs", "Patience", "Smooth window",
              "Stopped by", "Kept − neighbours (max)", "Train s", "Wall s", *(f"{d['split'].iloc[0]} {m}" for m in METRICS)]
    rows = []
    for r in d.to_dict("records"):
        with_epochs = r["stopped by patience"] + r["stopped by epoch bound"]
        stops = (f"patience {r['stopped by patience']}/{r['n']}" + (f", BOUND {r['stopped by epoch bound']}/{r['n']}"
                 if r["stopped by epoch bound"] else "")) if with_epochs else "–"
        rows.append([r["method"], str(r["n"]), mean_std_cell(r["epochs_run"], r["epochs_run std"], 1),
                     mean_std_cell(r["best_epoch"], r["best_epoch std"], 1), mean_std_cell(r["best_val_ndcg10"], r["best_val_ndcg10 std"], 4),
                     r["max_epochs"] or "–", r["patience"] or "–", r["smooth_window"] or "–", stops,
                     "–" if math.isnan(r["max_kept_margin"]) else f"{r['max_kept_margin']:+.4f}",
                     mean_std_cell(r["train_seconds"], r["train_seconds std"], 0), mean_std_cell(r["wall_seconds"], r["wall_seconds std"], 0),
                     *(mean_std_cell(r[m], r[f"{m} std"], 4) for m in METRICS)])
    return "\n".join([
        "### Retriever training: how each run ended", "",
        table(header, rows, text_columns=1),
        "Mean ± sample std over the method's seed runs. Best val NDCG@10: at the best epoch (the weights kept). "
        "Stopped by: early stopping's patience on validation NDCG@10 (counted on the mean of the last `Smooth window` "
        "validations), or the max_epochs bound (BOUND: still improving, not converged). Kept − neighbours (max): over "
        "the seeds, the largest margin of the kept epoch over its neighbouring validations (below). Wall s: the whole retriever run "
        "(run.json), – for runs that also trained a reranker or were resumed.\n",
    ])
