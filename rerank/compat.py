"""The transformers APIs this project uses that differ between the CPU set (requirements.txt:
transformers 5.23) and the GPU set (requirements-gpu.txt: transformers 5.17, unsloth's ceiling), in one
place. Each is detected by feature, not by version number. trl differs too (1.16 vs 1.15), but the
project's code never imports trl.

- Gradient checkpointing in TrainingArguments: `activation_checkpointing(_kwargs)` in 5.23, where
  `gradient_checkpointing(_kwargs)` is a deprecated alias; 5.17 has only `gradient_checkpointing(_kwargs)`.
- `logits_to_keep` as a boolean (batch, sequence) mask (the answer-only loss, rerank/train.py): 5.23's
  causal LMs take it (`modeling_utils.slice_logits_to_keep`) and return (N, vocabulary) logits; 5.17's
  index hidden_states[:, logits_to_keep, :] and fail on a 2-D mask. There the model gets the 1-D index of
  the columns holding any kept position (with left padding, the last few) and the kept rows are taken from
  its (batch, columns, vocabulary) logits: the same N rows in the same (row-major) order.
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
        return model(**inputs, logits_to_keep=keep).logits
    columns = keep.any(dim=0).nonzero().squeeze(1)  # sorted, so rows come out in keep's row-major order
    logits = model(**inputs, logits_to_keep=columns).logits  # (batch, columns, V)
    return logits[keep[:, columns]]
