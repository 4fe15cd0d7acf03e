"""Checks that can be decided before anything is spent, run before the first step they protect.

A setting that cannot work must stop the run before the retriever trains (run_experiment.py) or
before the reranker's first training step, not after minutes of training and ranking:
- `check_before_retriever`: the candidate count the retriever will write (retriever.top_k) against
  the label scheme and the prompt budget, when this run's reranker ranks this run's candidates;
- `check_before_training`: with the candidates and the tokenizer at hand, the prompt token budget
  (the longest titles of the catalogue, no history, must fit max_prompt_tokens: otherwise some
  prompt fails when built, during training or ranking) and the position-prior calibration (a
  "permuted" prior exists only for candidate counts that its validation users have).
Each message names a fix that passes these same checks (the preflight tests, `test_preflight`, run them).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from pipeline.candidates import is_covered
from pipeline.config import Config, RerankerConfig
from pipeline.data import load_dataset
from pipeline.errors import PipelineError
from rerank.inference.calibration import sample_users
from rerank.model.sources import load_tokenizer
from rerank.prompting.labels import encode, scheme_from_config
from rerank.prompting.prompts import encode_prompt
from rerank.prompting.style import PromptStyle, style_from_config
from rerank.prompting.titles import cut_title


def check_before_retriever(cfg: Config) -> None:
    """run_experiment.py: its reranker ranks the retriever's top_k candidates of this very run, so
    the label count and the prompt budget for top_k candidates are checked before the retriever
    trains (the dataset and the tokenizer load in seconds; the retriever trains for minutes)."""
    n = len(scheme_from_config(cfg.reranker).labels)
    k = cfg.retriever.top_k
    if k > n:
        raise PipelineError(
            f"retriever.top_k {k} is more than label scheme {cfg.reranker.label_scheme!r} has labels ({n}): "
            f"set retriever.top_k={n} (or lower), or reranker.label_scheme=custom with {k} reranker.custom_labels"
        )
    tokenizer = load_tokenizer(cfg.reranker.model, cache_dir=cfg.reranker.model_cache_dir)
    titles = load_dataset(cfg.data).titles[1:]
    check_prompt_budget(style_from_config(cfg.reranker, tokenizer), tokenizer, titles, max(k, cfg.reranker.train_candidates))


def check_before_training(
    cfg: Config,
    rows: Mapping[str, Sequence[Mapping[str, Any]]],
    titles: Sequence[str],
    tokenizer: Any,
    style: PromptStyle,
) -> None:
    """`rows`: the val/test candidates rows to rank; `titles`: every item title of the dataset."""
    rcfg = cfg.reranker
    counts = {len(r["candidates"]) for split_rows in rows.values() for r in split_rows if is_covered(r)}
    check_prompt_budget(style, tokenizer, titles, max(counts | {rcfg.train_candidates}))
    if rcfg.calibration == "permuted":
        check_calibration_counts(rows, rcfg, cfg.seed)


def check_prompt_budget(style: PromptStyle, tokenizer: Any, titles: Sequence[str], k: int) -> None:
    """The prompt of the k longest titles (each cut as prompts cut it) with no history is the longest
    any user can get: the prompt builder's own check refuses it when it exceeds max_prompt_tokens."""
    cut = {cut_title(t, tokenizer, style.title_max_tokens) for t in titles if t}
    longest = sorted(cut, key=lambda t: (-len(encode(tokenizer, t)), t))[:k]
    if len(longest) < k:  # a tiny catalogue: repeat titles to reach the count (the length is what counts)
        longest = (longest * k)[:k] if longest else []
    if longest:
        encode_prompt([], longest, tokenizer, style)


def check_calibration_counts(rows: Mapping[str, Sequence[Mapping[str, Any]]], rcfg: RerankerConfig, seed: int) -> None:
    """calibration=permuted estimates a prior per candidate count K from the sampled covered val
    users: every count to be ranked needs one of them."""
    sampled = {len(r["candidates"]) for r in sample_users(rows["val"], rcfg.calibration_users, seed)}
    every_val = {len(r["candidates"]) for r in rows["val"] if is_covered(r)}
    for split, split_rows in rows.items():
        for r in split_rows:
            k = len(r["candidates"])
            if not is_covered(r) or k in sampled:
                continue
            fix = (
                "set reranker.calibration_users=null (every covered val user)"
                if k in every_val else "use reranker.calibration=content_free (no val user has that many)"
            )
            raise PipelineError(
                f"reranker.calibration=permuted has no validation user with {k} candidates to estimate the position prior "
                f"for {split} user {r['user']!r} ({'no covered val users at all' if not sampled else f'sampled counts: {sorted(sampled)}'}): {fix}"
            )
