"""A whole retriever run: data -> fit -> candidates and metrics for val and test -> run dir.

Resumable: with `resume`, a finished stage (every candidates file, the per-prefix train candidates
when retriever.prefix_candidates asks for them, and the val/test metrics written) is kept as it
is; an unfinished one continues training from the last epoch the killed run finished
(`retrieval.training.fit`, `retriever_state.pt`, removed once the stage is finished).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from pipeline.atomic import write_json, write_text
from pipeline.candidates import candidates_path, prefix_candidates_path, write_prefix_rows, write_rows
from pipeline.config import Config
from pipeline.data import CANDIDATE_SPLITS, SPLITS, load_dataset
from pipeline.data.preprocess import stats_markdown
from pipeline.markdown import markdown_table
from pipeline.run_files import DATASET_STATS, METRICS_JSON, METRICS_MD, RETRIEVER_SUMMARY
from pipeline.rundir import RunDir
from retrieval.candidates import retrieve, retrieve_prefixes
from retrieval.registry import build_retriever
from retrieval.training import STATE_FILE


def train_retriever(cfg: Config, run: RunDir, resume: bool = False) -> dict:
    """Fit `cfg.retriever` on `cfg.data`; write candidates_{train,val,test}.jsonl, with
    retriever.prefix_candidates != 0 candidates_train_prefixes.jsonl, and metrics.json (val and
    test). `resume`: keep the stage when `run` already holds it finished."""
    if resume and retriever_finished(run.path, cfg.retriever.prefix_candidates):
        print(f"retriever: kept the finished stage in {run.path} (--resume)")
        metrics = json.loads((run / METRICS_JSON).read_text())
        if not (run / METRICS_MD).is_file():  # killed between the metrics and their table
            write_text(run / METRICS_MD, retriever_table(metrics, cfg.retriever.model))
        return metrics
    ds = load_dataset(cfg.data)
    print(stats_markdown(ds.stats))
    write_json(run / DATASET_STATS, ds.stats)
    retriever = build_retriever(cfg.retriever, ds)
    summary = retriever.fit(ds, cfg.retriever, cfg.seed, run.path, resume=resume)
    write_json(run / RETRIEVER_SUMMARY, summary)
    prefix_file = prefix_candidates_path(run.path)
    if cfg.retriever.prefix_candidates != 0:  # before the metrics, which mark the stage finished
        start = time.perf_counter()
        rows = retrieve_prefixes(retriever.score, ds, cfg.retriever.top_k, cfg.retriever.prefix_candidates)
        write_prefix_rows(prefix_file, rows)
        n_prefixes = sum(len(r["positions"]) for r in rows)
        print(f"retriever: wrote {n_prefixes} train prefixes to {prefix_file.name} in {time.perf_counter() - start:.1f} s")
    else:  # a stale file of an earlier run would give the reranker another retriever's negatives
        prefix_file.unlink(missing_ok=True)
    metrics = {}
    for split in CANDIDATE_SPLITS:
        rows, section = retrieve(retriever.score, ds, split, cfg.retriever.top_k)
        write_rows(candidates_path(run.path, split), rows)
        if split in SPLITS:  # train targets were fitted on: their metrics would flatter the model
            metrics = run.update_metrics(split, section)
    write_text(run / METRICS_MD, retriever_table(metrics, cfg.retriever.model))
    (run / STATE_FILE).unlink(missing_ok=True)  # the stage is finished: nothing left to resume
    run.stage_finished("retriever")  # a later failure of the run keeps it
    return metrics


def retriever_finished(run_dir: str | Path, prefix_candidates: Optional[int] = 0) -> bool:
    """True when `run_dir` holds a finished retriever stage: every candidates file, the per-prefix
    train candidates when `prefix_candidates` (retriever.prefix_candidates) != 0, and the retriever
    metrics of val and test (written last, after the candidates files)."""
    run_dir = Path(run_dir)
    if not all(candidates_path(run_dir, split).is_file() for split in CANDIDATE_SPLITS):
        return False
    if prefix_candidates != 0 and not prefix_candidates_path(run_dir).is_file():
        return False
    try:
        metrics = json.loads((run_dir / METRICS_JSON).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(metrics, dict) and all("retriever" in metrics.get(split, {}) for split in SPLITS)


def retriever_table(metrics: dict, model: str, ks=(5, 10, 20)) -> str:
    cols = [f"{m}@{k}" for k in ks for m in ("NDCG", "Recall", "MRR")]
    rows = [[split, *(f"{sec['retriever'][c]:.4f}" for c in cols), f"{sec['coverage']:.4f}"] for split, sec in metrics.items()]
    return markdown_table([f"{model} split", *cols, "coverage"], rows) + "\n"
