"""The same small tuning budget for every retriever, chosen on validation NDCG@10 only (seed 0).

Coordinate-wise, to fit 2 cores; each point is an ordinary run directory of train_retriever.py under
<out>/<model>/<point name>_seed<k>, so a rerun keeps what finished:
  stage 1: batch size {16, 64} windows x optimiser {LRURec's AdamW (weight decay 0.01, clipping at 5),
           recbole's Adam (no decay, no clipping)}, at the config's dropout and learning rate;
  stage 2: at stage 1's best, dropout (= attn_dropout) {0.1, 0.2, 0.5} x learning rate {1e-3, 3e-4};
  stage 3: the winner again for the other seeds (its seed-0 run is the grid's).
The score of a point is its best validation NDCG@10 (retriever_summary.json); ties go to the point
listed first. Test numbers are never read here.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

from pipeline.config import load_config
from pipeline.markdown import markdown_table
from pipeline.run_files import RETRIEVER_SUMMARY, RUN_JSON

VAL_KEY = "best_val_NDCG@10"
BATCH_SIZES = (16, 64)
# The two optimisers compared: the config keys each sets (retrieval/training.py make_optimizer).
OPTIMIZERS = {
    "adamw": {"optimizer": "adamw", "weight_decay": 0.01, "grad_clip": 5.0},  # LRURec's (paper)
    "adam": {"optimizer": "adam", "weight_decay": 0.0, "grad_clip": None},  # recbole's usual
}
DROPOUTS = (0.1, 0.2, 0.5)
LEARNING_RATES = (1e-3, 3e-4)


def config_path(model: str) -> str:
    return f"configs/retrieval/{model}_ml-100k.yaml"


@dataclass(frozen=True)
class Point:
    batch_size: int
    optimizer: str  # a key of OPTIMIZERS
    dropout: float
    lr: float

    @property
    def name(self) -> str:
        return f"bs{self.batch_size}_{self.optimizer}_do{self.dropout:g}_lr{self.lr:g}"

    def overrides(self) -> list[str]:
        """The --set overrides of this point (dropout sets attn_dropout too, as the configs do)."""
        sets = {"batch_size": self.batch_size, "dropout": self.dropout, "attn_dropout": self.dropout, "lr": self.lr,
                **OPTIMIZERS[self.optimizer]}
        return [f"retriever.{k}={'null' if v is None else v}" for k, v in sets.items()]


def base_point(model: str, repo: Path) -> Point:
    """The model's config as a point (its dropout and learning rate are stage 1's)."""
    r = load_config(repo / config_path(model)).retriever
    return Point(r.batch_size, "adamw", r.dropout, r.lr)


def stage1(base: Point) -> list[Point]:
    return [replace(base, batch_size=b, optimizer=o) for b in BATCH_SIZES for o in OPTIMIZERS]


def stage2(best: Point) -> list[Point]:
    return [replace(best, dropout=d, lr=lr) for d in DROPOUTS for lr in LEARNING_RATES]


def run_dir(out: Path, model: str, point: Point, seed: int = 0) -> Path:
    return Path(out) / model / f"{point.name}_seed{seed}"


def val_score(run: Path) -> Optional[float]:
    """The run's best validation NDCG@10, None while it has not finished."""
    try:
        finished = json.loads((run / RUN_JSON).read_text(encoding="utf-8"))
        summary = json.loads((run / RETRIEVER_SUMMARY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return summary.get(VAL_KEY) if finished.get("end") and not finished.get("error") else None


def best_point(points: Sequence[Point], out: Path, model: str) -> Point:
    """The point with the highest validation score (ties: the earlier point); every one must be finished."""
    scores = [val_score(run_dir(out, model, p)) for p in points]
    missing = [p.name for p, s in zip(points, scores) if s is None]
    if missing:
        raise ValueError(f"unfinished grid points: {', '.join(missing)}")
    return points[max(range(len(points)), key=lambda i: (scores[i], -i))]


def grid_table(model: str, stages: Sequence[tuple[str, Sequence[Point]]], out: Path, chosen: Optional[Point]) -> str:
    """Markdown: every point's validation NDCG@10 (seed 0), epochs and seconds; the chosen one marked."""
    rows = []
    for stage, points in stages:
        for p in points:
            run = run_dir(out, model, p)
            s = val_score(run)
            summary = _summary(run) if s is not None else {}
            mark = " **chosen**" if chosen == p else ""
            rows.append([
                stage, p.batch_size, p.optimizer, f"{p.dropout:g}", f"{p.lr:g}", f"{'–' if s is None else f'{s:.4f}'}{mark}",
                f"{summary.get('best_epoch', '–')} / {summary.get('epochs_run', '–')}", summary.get("train_seconds", "–"),
            ])
    header = ["stage", "batch", "optimiser", "dropout", "lr", "val NDCG@10", "best epoch / run", "train s"]
    return "\n".join([f"# {model}: tuning on validation NDCG@10 (seed 0)", "", markdown_table(header, rows, "lrlrrrlr")]) + "\n"


def _summary(run: Path) -> dict:
    return json.loads((run / RETRIEVER_SUMMARY).read_text(encoding="utf-8"))
