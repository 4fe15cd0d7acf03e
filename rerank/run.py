"""A whole reranker run: candidates files -> LoRA training -> rankings and metrics -> run dir.

Reads only the retriever run's files (candidates_<split>.jsonl, metrics.json), never its code.
"""
from __future__ import annotations

import json
from pathlib import Path

from pipeline.atomic import write_text
from pipeline.candidates import candidates_path, rankings_path, read_rows, write_rows
from pipeline.config import Config
from pipeline.data import SPLITS, load_dataset
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir
from rerank.evaluate import markdown_table, rank_split, titles_by_item
from rerank.models import load_from_config
from rerank.prompts import style_from_config
from rerank.samples import samples_from_config
from rerank.train import train_reranker


def rerank_run(cfg: Config, run: RunDir, candidates_dir: str | Path) -> dict:
    """Train the reranker on `cfg.data`, rank the val and test candidates of `candidates_dir`,
    write rankings_<split>.jsonl and the reranker sections of metrics.json; returns metrics."""
    candidates_dir = Path(candidates_dir)
    ds = load_dataset(cfg.data)
    known = set(ds.item_ids[1:])
    rows = {split: read_rows(candidates_path(candidates_dir, split), known) for split in SPLITS}
    train_rows = None
    if cfg.reranker.train_negatives == "retriever":
        train_rows = read_rows(candidates_path(candidates_dir, "train"), known)
    model, tokenizer = load_from_config(cfg.reranker)
    style = style_from_config(cfg.reranker, tokenizer)
    samples = samples_from_config(ds, cfg.reranker, cfg.seed, retriever_rows=train_rows)
    print(f"reranker: {len(samples)} training prompts, model {cfg.reranker.model}, labels {style.scheme.name}")
    train_reranker(model, tokenizer, style, ds, samples, rows["val"], cfg.reranker, run.path, seed=cfg.seed)

    titles = titles_by_item(ds)
    retriever_metrics = _retriever_metrics(candidates_dir)
    metrics: dict = {}
    for split in SPLITS:
        rankings, section = rank_split(model, tokenizer, style, rows[split], titles, cfg.reranker, seed=cfg.seed)
        # The retriever run's full-catalogue metrics (k up to 50) supersede the candidates-based
        # ones; they agree for k <= 20 because the candidates are the retriever's top 20.
        if split in retriever_metrics:
            section["retriever"] = retriever_metrics[split]
        write_rows(rankings_path(run.path, split), rankings)
        metrics = run.update_metrics(split, section)
    write_text(run / "metrics.md", results_markdown(metrics, cfg))
    return metrics


def _retriever_metrics(candidates_dir: Path) -> dict:
    path = candidates_dir / "metrics.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError:
        raise PipelineError(f"{path} is not valid JSON: re-run the retriever") from None
    return {split: sec["retriever"] for split, sec in data.items() if isinstance(sec, dict) and "retriever" in sec}


def results_markdown(metrics: dict, cfg: Config) -> str:
    parts = [f"# {cfg.retriever.model} -> {cfg.reranker.model} ({cfg.reranker.label_scheme}), {cfg.data.dataset}"]
    for split in SPLITS:
        if split in metrics:
            parts += ["", f"## {split}", "", markdown_table(metrics[split])]
    return "\n".join(parts) + "\n"
