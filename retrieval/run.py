"""A whole retriever run: data -> fit -> candidates and metrics for val and test -> run dir.

Resumable: with `resume`, a finished stage (every candidates file and the val/test metrics
written) is kept as it is; an unfinished one is fitted again from scratch (the retriever fits in
minutes and keeps no checkpoints).
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import write_json, write_text
from pipeline.candidates import candidates_path, write_rows
from pipeline.config import Config
from pipeline.data import CANDIDATE_SPLITS, SPLITS, load_dataset
from pipeline.data.preprocess import stats_markdown
from pipeline.rundir import RunDir
from retrieval.candidates import retrieve
from retrieval.registry import build_retriever


def train_retriever(cfg: Config, run: RunDir, resume: bool = False) -> dict:
    """Fit `cfg.retriever` on `cfg.data`; write candidates_{train,val,test}.jsonl and metrics.json
    (val and test). `resume`: keep the stage when `run` already holds it finished."""
    if resume and retriever_finished(run.path):
        print(f"retriever: kept the finished stage in {run.path} (--resume)")
        metrics = json.loads((run / "metrics.json").read_text())
        if not (run / "metrics.md").is_file():  # killed between the metrics and their table
            write_text(run / "metrics.md", retriever_table(metrics, cfg.retriever.model))
        return metrics
    ds = load_dataset(cfg.data)
    print(stats_markdown(ds.stats))
    write_json(run / "dataset_stats.json", ds.stats)
    retriever = build_retriever(cfg.retriever, ds)
    summary = retriever.fit(ds, cfg.retriever, cfg.seed, run.path)
    write_json(run / "retriever_summary.json", summary)
    metrics = {}
    for split in CANDIDATE_SPLITS:
        rows, section = retrieve(retriever.score, ds, split, cfg.retriever.top_k)
        write_rows(candidates_path(run.path, split), rows)
        if split in SPLITS:  # train targets were fitted on: their metrics would flatter the model
            metrics = run.update_metrics(split, section)
    write_text(run / "metrics.md", retriever_table(metrics, cfg.retriever.model))
    return metrics


def retriever_finished(run_dir: str | Path) -> bool:
    """True when `run_dir` holds a finished retriever stage: every candidates file and the
    retriever metrics of val and test (written last, after the candidates files)."""
    run_dir = Path(run_dir)
    if not all(candidates_path(run_dir, split).is_file() for split in CANDIDATE_SPLITS):
        return False
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(metrics, dict) and all("retriever" in metrics.get(split, {}) for split in SPLITS)


def retriever_table(metrics: dict, model: str, ks=(5, 10, 20)) -> str:
    cols = [f"{m}@{k}" for k in ks for m in ("NDCG", "Recall", "MRR")]
    lines = [f"| {model} split | " + " | ".join(cols) + " | coverage |", "|---" * (len(cols) + 2) + "|"]
    for split, sec in metrics.items():
        vals = " | ".join(f"{sec['retriever'][c]:.4f}" for c in cols)
        lines.append(f"| {split} | {vals} | {sec['coverage']:.4f} |")
    return "\n".join(lines) + "\n"
