"""Reading run directories for the paper's tables: one `Run` per directory, every file it needs
checked first (a one-line PipelineError names what is missing and the fix)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import yaml

from analysis import paper
from pipeline.candidates import candidates_path, rankings_path
from pipeline.errors import PipelineError
from pipeline.run_files import CONFIG_YAML, METRICS_JSON

SPLIT = "test"  # the paper's tables report the test split
# The paper's columns, in its order: MRR, NDCG, Recall at 5 then at 10 (full names, "MRR@5", ...).
PAPER_METRICS = tuple(f"{m}@{k}" for k in (5, 10) for m in ("MRR", "NDCG", "Recall"))
# Config keys that do not change what a run measures, left out when runs are grouped into one
# method's seeds (`seed` itself is what the runs of a method vary).
RETRIEVER_BOOKKEEPING = ("device",)
RERANKER_BOOKKEEPING = ("resume", "device", "model_cache_dir", "dataloader_workers", "save_total_limit", "logging_steps")


@dataclass(frozen=True)
class Run:
    """One run directory, read and checked: what the tables need from it."""

    path: Path
    data: Mapping[str, Any]  # the config's data section
    retriever: str  # paper name of the retriever whose candidates/metrics this run holds (LRURec, ...)
    retriever_source: str  # the directory that produced those candidates (dedupes retriever rows)
    section: Mapping[str, Any]  # metrics.json[split]
    reranker_model: Optional[str] = None  # None for a retriever-only run
    label_scheme: Optional[str] = None
    seed: Any = None  # the run's config seed
    retriever_seed: Any = None  # the seed of the run that produced the candidates
    retriever_key: str = ""  # the retriever's method: runs with equal keys are seeds of one method
    reranker_key: str = ""  # reranker runs only: retriever_key + the reranker's settings

    @property
    def is_reranker(self) -> bool:
        return self.reranker_model is not None

    @property
    def reranker_name(self) -> str:
        return f"LLM reranker ({self.reranker_model}, {self.label_scheme}) on {self.retriever}"


def load_yaml(path: Path) -> dict:
    """A run's config.yaml as a mapping; a bad file is one PipelineError."""
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path} is not valid YAML ({type(e).__name__}): regenerate the run") from None
    if not isinstance(cfg, dict):
        raise PipelineError(f"{path} is not a config mapping: regenerate the run")
    return cfg


def _config_value(cfg: Mapping[str, Any], path: Path, section: str, key: str) -> str:
    """cfg[section][key], which must be a non-empty string."""
    sec = cfg.get(section)
    value = sec.get(key) if isinstance(sec, dict) else None
    if not isinstance(value, str) or not value:
        raise PipelineError(f"{path} has no {section}.{key}: pass a run directory written by this pipeline's scripts")
    return value


def _method_key(section: Any, leave_out: Sequence[str]) -> str:
    """A config section as canonical JSON without the keys in `leave_out`."""
    section = section if isinstance(section, dict) else {}
    return json.dumps({k: v for k, v in section.items() if k not in leave_out}, sort_keys=True, default=str)


def _retriever_of(path: Path, cfg: Mapping[str, Any], split: str) -> tuple[str, str, str, Any]:
    """(paper name, source directory, method key, seed) of the retriever behind a run. A run
    holding its own candidates (train_retriever.py, run_experiment.py) is its own source; a
    train_reranker.py run reranked `retriever_run`, whose config names the model (its own config's
    retriever section is whatever the reranker config said, not necessarily what produced the
    candidates). The key is the source's retriever section without `seed` and bookkeeping."""
    cfg_path = path / CONFIG_YAML
    model = _config_value(cfg, cfg_path, "retriever", "model")
    source, source_cfg = path, cfg
    retriever_run = cfg.get("retriever_run")
    if not candidates_path(path, split).is_file() and retriever_run:
        source = Path(retriever_run)
        if (source / CONFIG_YAML).is_file():
            source_cfg = load_yaml(source / CONFIG_YAML)
            model = _config_value(source_cfg, source / CONFIG_YAML, "retriever", "model")
    key = _method_key(source_cfg.get("retriever"), RETRIEVER_BOOKKEEPING)
    return paper.METHOD_NAMES.get(model, model), str(source.resolve()), key, source_cfg.get("seed")


def load_run(path: str | Path, split: str = SPLIT) -> Run:
    """Read one run directory; a one-line PipelineError names what is missing and the fix."""
    path = Path(path)
    if not (path / CONFIG_YAML).is_file():
        raise PipelineError(
            f"{path} is not a run directory (no config.yaml): pass directories written by "
            "train_retriever.py, train_reranker.py or run_experiment.py"
        )
    cfg = load_yaml(path / CONFIG_YAML)
    data = cfg.get("data")
    if not isinstance(data, dict) or not isinstance(data.get("dataset"), str):
        raise PipelineError(f"{path / 'config.yaml'} has no data.dataset: pass a run directory written by this pipeline's scripts")
    metrics_file = path / METRICS_JSON
    if not metrics_file.is_file():
        raise PipelineError(f"{path} has no metrics.json (the run did not finish): rerun it or leave it out of --runs")
    try:
        metrics = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise PipelineError(f"{metrics_file} is not valid JSON: rerun the run") from None
    section = metrics.get(split) if isinstance(metrics, dict) else None
    if not isinstance(section, dict):
        raise PipelineError(f"{metrics_file} has no {split!r} split: pass finished runs (they measure val and test)")
    required = ["retriever"]
    is_reranker = "subset" in section
    if is_reranker:
        required += ["retriever_subset", "subset", "overall", "n_users", "n_covered"]
    for key in required:
        if key not in section:
            raise PipelineError(f"{metrics_file} [{split}] has no {key!r}: rerun the run with the current scripts")
    if is_reranker:
        n_users, n_covered = section["n_users"], section["n_covered"]
        if not (isinstance(n_users, int) and isinstance(n_covered, int) and 0 <= n_covered <= n_users and n_users > 0):
            raise PipelineError(f"{metrics_file} [{split}] has n_users {n_users!r}, n_covered {n_covered!r}: rerun the run")
    for key in ("retriever", *(("retriever_subset", "subset", "overall") if is_reranker else ())):
        missing = [m for m in PAPER_METRICS if not isinstance(section[key].get(m), (int, float))]
        if missing:
            raise PipelineError(f"{metrics_file} [{split}][{key}] has no {missing[0]}: rerun the run with the current scripts")
    retriever, source, retriever_key, retriever_seed = _retriever_of(path, cfg, split)
    seeds = dict(seed=cfg.get("seed"), retriever_seed=retriever_seed, retriever_key=retriever_key)
    if not is_reranker:
        return Run(path, data, retriever, source, section, **seeds)
    if not rankings_path(path, split).is_file():
        raise PipelineError(f"{path} has reranker metrics but no {rankings_path(path, split).name}: rerun train_reranker.py")
    return Run(
        path, data, retriever, source, section,
        reranker_model=_config_value(cfg, path / CONFIG_YAML, "reranker", "model"),
        label_scheme=_config_value(cfg, path / CONFIG_YAML, "reranker", "label_scheme"),
        reranker_key=retriever_key + "\n" + _method_key(cfg.get("reranker"), RERANKER_BOOKKEEPING),
        **seeds,
    )


def load_runs(paths: Sequence[str | Path], split: str = SPLIT) -> list[Run]:
    if not paths:
        raise PipelineError("no runs given: pass --runs RUN_DIR [RUN_DIR ...]")
    runs = [load_run(p, split) for p in paths]
    seen: dict[Path, Path] = {}
    for run in runs:
        key = run.path.resolve()
        if key in seen:
            raise PipelineError(f"run {run.path} is given twice (also as {seen[key]}): pass each run once")
        seen[key] = run.path
    return runs
