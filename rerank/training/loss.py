"""The answer-only training losses: vocabulary cross-entropy at the supervised positions, and the labels loss."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError
from rerank.model.compat import masked_logits
from rerank.model.readout import padded_positions
from rerank.prompting.labels import LabelTokens
from rerank.training.collate import IGNORE_INDEX


def supervised_logits(
    model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets): the vocabulary logits at each position that predicts a supervised token
    (labels != IGNORE_INDEX), (N, V), and those N tokens. Only these N positions go through the
    output layer. Positions count real tokens only, as at ranking, so left padding changes nothing."""
    predicts = labels[:, 1:] != IGNORE_INDEX  # position p predicts token p + 1
    keep = F.pad(predicts, (0, 1), value=False)  # (B, L) bool: the positions whose logits we need
    position_ids = padded_positions(attention_mask)
    # The boolean mask where this transformers takes one, its columns otherwise (`masked_logits`).
    logits = masked_logits(model, keep, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    n = int(predicts.sum())
    if logits.dim() != 2 or logits.shape[0] != n:
        raise PipelineError(
            f"{type(model).__name__} ignored the boolean logits_to_keep mask (logits {tuple(logits.shape)}, want ({n}, V)): "
            "use a transformers causal LM class that supports it (transformers >= 5)"
        )
    return logits, labels[:, 1:][predicts]


def labels_loss_sum(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    target_index: torch.Tensor,
    tokens: LabelTokens,
    pad_id: int,
    spans: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Sum over the batch of the cross-entropy over the K candidate labels: -log softmax_k(score_k)
    at the target's label, score_k the ranker's own label score (`ranker.label_scores`, one
    definition for training and ranking). Only the label rows of the output layer are used at the
    answer position (the log-partition there is the same for every label and cancels). `spans`: the
    candidate lines shown isolated (`label_scores`)."""
    from rerank.inference.ranker import label_scores, plan_for

    scores = label_scores(model, prompt_ids, prompt_mask, tokens.scored_ids, plan_for(tokens), pad_id, normalized=False, spans=spans)
    return F.cross_entropy(scores, target_index, reduction="sum")
