"""A finished reranker run directory, opened for analysis: its config, data, candidates and model.

The analysis scripts (generation baseline, position bias, benchmarks) start from a run that
scripts/train_reranker.py or scripts/run_experiment.py wrote. Everything they need comes from that
directory: config.yaml (the resolved config), adapter/ (LoRA weights + prompt_style.json, so the
prompts are exactly the ones the adapter was trained on), and the candidates files of the
retriever run it reranked (the run itself for run_experiment.py, else its `retriever_run`).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Optional

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline import rng_streams
from pipeline.candidates import candidates_path, covered_sample, rankings_path, read_rows
from pipeline.config import Config, load_config
from pipeline.data import load_dataset
from pipeline.data.dataset import SplitDataset, titles_by_item
from pipeline.errors import PipelineError
from pipeline.run_files import CONFIG_YAML
from rerank.model.adapter import load_adapter, resolve_adapter_dir
from rerank.model.sources import load_from_config
from rerank.prompting.style import PromptStyle, check_tokenizer


@dataclass
class RerankerRun:
    """A reranker run directory. Nothing heavy is loaded until asked for."""

    path: Path
    cfg: Config

    @property
    def candidates_dir(self) -> Path:
        """Where this run's candidates came from: the run itself (run_experiment.py) or its retriever_run."""
        if candidates_path(self.path, "val").is_file():
            return self.path
        if self.cfg.retriever_run and candidates_path(self.cfg.retriever_run, "val").is_file():
            return Path(self.cfg.retriever_run)
        raise PipelineError(
            f"no candidates for run {self.path}: neither it nor its retriever_run {self.cfg.retriever_run!r} "
            "holds candidates_val.jsonl; run the analysis from the directory the run was made in"
        )

    @cached_property
    def dataset(self) -> SplitDataset:
        return load_dataset(self.cfg.data)

    @cached_property
    def titles(self) -> dict[str, str]:
        return titles_by_item(self.dataset)

    def rows(self, split: str) -> list[dict[str, Any]]:
        """All users' candidates rows of `split`, validated against the run's dataset."""
        return read_rows(candidates_path(self.candidates_dir, split), set(self.dataset.item_ids[1:]))

    def covered_rows(self, split: str, max_users: Optional[int] = None, seed: Optional[int] = None) -> list[dict[str, Any]]:
        """The covered users' rows (the ones the reranker ranks), in file order; with `max_users`, a
        uniform sample of that many seeded by (`seed`, default the run's seed), still in file order."""
        return covered_sample(self.rows(split), max_users, self.cfg.seed if seed is None else seed, rng_streams.ANALYSIS_USERS)

    def rankings(self, split: str) -> list[dict[str, Any]]:
        """The run's own rankings rows of `split` (covered users, reranker scores)."""
        return read_rows(rankings_path(self.path, split))

    def load_model(self, prepare_base: Callable[[PreTrainedModel], PreTrainedModel] = lambda base: base,
                   ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, PromptStyle]:
        """(base model + the trained adapter in eval mode, tokenizer, the adapter's prompt style).
        `prepare_base` changes the base before the adapter goes on (the export dequantises a 4-bit one)."""
        base, tokenizer = load_from_config(self.cfg.reranker)
        style = PromptStyle.load(resolve_adapter_dir(self.path))
        check_tokenizer(style, tokenizer)
        return load_adapter(prepare_base(base), self.path), tokenizer, style


def open_run(run_dir: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RerankerRun:
    """The reranker run in `run_dir` (its config.yaml, plus `overrides` such as reranker.device=cpu)."""
    path = Path(run_dir)
    if not (path / CONFIG_YAML).is_file():
        raise PipelineError(f"{path} is not a run directory (no config.yaml): pass a directory written by train_reranker.py or run_experiment.py")
    resolve_adapter_dir(path)  # a reranker run: fails with the fix when there is no adapter
    return RerankerRun(path, load_config(path / CONFIG_YAML, overrides))
