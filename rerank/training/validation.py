"""Validation during training: which val users, their shuffled copy, and NDCG/Recall/MRR of the ranker's scores."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from transformers import (
    PreTrainedTokenizerBase,
)

from pipeline import rng_streams
from pipeline.candidates import covered_sample
from pipeline.errors import PipelineError
from pipeline.metrics import candidate_rank, metrics_from_ranks
from rerank.prompting.style import PromptStyle

VAL_KS = (1, 5, 10)  # validation cut-offs (paper: rerank_metric_ks)

VAL_METRIC = "NDCG@10"  # early stopping / best adapter metric (paper)

# (model, covered val rows) -> each row's scores aligned with row["candidates"].
ScoreRows = Callable[[torch.nn.Module, Sequence[Mapping[str, Any]]], list[list[float]]]


def ranking_metrics(scores: Sequence[Sequence[float]], rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """NDCG/Recall/MRR@VAL_KS of rows scored by `scores` (target rank among each row's candidates)."""
    if len(scores) != len(rows):
        raise PipelineError(f"the scorer returned {len(scores)} score lists for {len(rows)} rows: fix the scorer")
    ranks = [candidate_rank(s, r["candidates"], r["target"]) for s, r in zip(scores, rows)]
    return metrics_from_ranks(ranks, VAL_KS)


def shuffled_rows(rows: Sequence[Mapping[str, Any]], seed: int) -> list[dict[str, Any]]:
    """`rows` with each row's candidates (and their scores) in a permutation seeded by (seed, user):
    what the LLM sees when the retriever's order carries no information."""
    out = []
    for row in rows:
        order = np.random.default_rng([seed, rng_streams.VAL_SHUFFLE, *str(row["user"]).encode()]).permutation(len(row["candidates"]))
        out.append({**row, "candidates": [row["candidates"][i] for i in order], "scores": [row["scores"][i] for i in order]})
    return out




def select_val_rows(rows: Sequence[Mapping[str, Any]], max_users: Optional[int], seed: int) -> list[Mapping[str, Any]]:
    """The covered rows (target among the candidates: the users the reranker sees), a seeded uniform
    sample of `max_users` of them when given, in file order."""
    return covered_sample(rows, max_users, seed, rng_streams.VAL_USERS)




def ranking_scorer(
    tokenizer: PreTrainedTokenizerBase, style: PromptStyle, titles_by_item: Mapping[str, str], batch_size: int
) -> ScoreRows:
    """The ranker (`rank_rows`, one pass, the retriever's candidate order) as a ScoreRows."""
    from rerank.inference.ranker import rank_rows

    def score(model: torch.nn.Module, rows: Sequence[Mapping[str, Any]]) -> list[list[float]]:
        return rank_rows(model, tokenizer, style, rows, titles_by_item, batch_size=batch_size, progress=False)

    return score
