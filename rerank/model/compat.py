"""The transformers APIs this project uses that differ between transformers releases, in one place. Both
pinned sets (requirements.txt, requirements-gpu.txt) now hold transformers 5.23; the older branches serve an
environment a researcher brings (transformers 5.17 and earlier 5.x) and were the GPU set's until unsloth, which
capped it at 5.17, left it (README, GPU). Each is detected by feature, not by version number.

- Gradient checkpointing in TrainingArguments: `activation_checkpointing(_kwargs)` in 5.23, where
  `gradient_checkpointing(_kwargs)` is a deprecated alias; 5.17 has only `gradient_checkpointing(_kwargs)`.
- `logits_to_keep` as a boolean (batch, sequence) mask (the answer-only loss, `rerank.training.loss`): 5.23's
  causal LMs take it (`modeling_utils.slice_logits_to_keep`) and return (N, vocabulary) logits; 5.17's
  index hidden_states[:, logits_to_keep, :] and fail on a 2-D mask. There the model gets the 1-D index of
  the columns holding any kept position (with left padding, the last few) and the kept rows are taken from
  its (batch, columns, vocabulary) logits: the same N rows in the same (row-major) order.
- A forward that ignores a tensor `logits_to_keep` (unsloth 2026.10.9's Llama/Qwen forward turns one into 0)
  returns every position's (batch, sequence, vocabulary) logits: the kept rows are taken from those.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import transformers.modeling_utils
from transformers import TrainingArguments

# transformers >= 5.2x: the boolean mask is sliced by the model itself.
BOOLEAN_LOGITS_TO_KEEP = hasattr(transformers.modeling_utils, "slice_logits_to_keep")
_ARG_NAMES = {f.name for f in dataclasses.fields(TrainingArguments)}
CHECKPOINTING_ARG = "activation_checkpointing" if "activation_checkpointing" in _ARG_NAMES else "gradient_checkpointing"


def checkpointing_args(enabled: bool, kwargs: dict[str, Any]) -> dict[str, Any]:
    """TrainingArguments keywords that turn gradient (activation) checkpointing on or off, with `kwargs`
    for torch.utils.checkpoint, under this transformers' names."""
    return {CHECKPOINTING_ARG: enabled, f"{CHECKPOINTING_ARG}_kwargs": dict(kwargs)}


def masked_logits(model: torch.nn.Module, keep: torch.Tensor, **inputs: Any) -> torch.Tensor:
    """The vocabulary logits at the True positions of `keep` (batch, sequence), shape (N, V), in
    row-major order: `model(**inputs, logits_to_keep=keep).logits` where transformers supports the mask."""
    if BOOLEAN_LOGITS_TO_KEEP:
        logits = model(**inputs, logits_to_keep=keep).logits
    else:
        columns = keep.any(dim=0).nonzero().squeeze(1)  # sorted, so rows come out in keep's row-major order
        logits = model(**inputs, logits_to_keep=columns).logits
        if logits.dim() == 3 and logits.shape[1] == columns.numel():  # (batch, columns, V): the cut was made
            return logits[keep[:, columns]]
    if logits.dim() == 3 and logits.shape[:2] == keep.shape:  # every position's logits: the cut was ignored
        return logits[keep]
    return logits
