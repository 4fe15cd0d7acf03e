"""`rerank.model.compat`: the transformers API differences between the CPU and the GPU set give the same results."""
import dataclasses

import pytest
import torch
from transformers import TrainingArguments

from rerank.model import compat


def test_column_fallback_gives_the_boolean_masks_logits(monkeypatch):
    from rerank.model.sources import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny-qwen2")
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    keep = torch.zeros(3, 12, dtype=torch.bool)
    keep[0, 10:] = keep[1, 9] = keep[2, 5] = keep[2, 11] = True  # counts differ per row
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits[keep]  # every position, then the kept rows
        monkeypatch.setattr(compat, "BOOLEAN_LOGITS_TO_KEEP", False)  # as transformers 5.17
        fallback = compat.masked_logits(model, keep, input_ids=ids, attention_mask=mask)
    assert fallback.shape == (5, reference.shape[1])
    torch.testing.assert_close(fallback, reference, rtol=1e-5, atol=1e-5)


def test_checkpointing_args_are_this_transformers_names(tmp_path):
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    args = compat.checkpointing_args(True, {"use_reentrant": False})
    assert set(args) <= names and len(args) == 2  # an unknown keyword would be a TypeError in TrainingArguments
    built = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, **args)
    assert getattr(built, compat.CHECKPOINTING_ARG) is True
    assert getattr(built, f"{compat.CHECKPOINTING_ARG}_kwargs") == {"use_reentrant": False}


class _FullLogits(torch.nn.Module):
    """A causal LM whose forward ignores a tensor `logits_to_keep` and returns every position's logits,
    (B, L, V), as unsloth 2026.10.9's Llama/Qwen forward does (it turns a tensor into 0: models/llama.py)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, logits_to_keep=0, **inputs):
        assert isinstance(logits_to_keep, torch.Tensor)  # the caller asked for a cut...
        return self.model(**inputs)  # ...and gets none


@pytest.mark.parametrize("boolean", [True, False], ids=["boolean_mask", "column_fallback"])
def test_full_length_logits_give_the_kept_rows(boolean, monkeypatch):
    from rerank.model.sources import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny-qwen2")
    ids = torch.randint(0, 1000, (3, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    keep = torch.zeros(3, 12, dtype=torch.bool)
    keep[0, 10:] = keep[1, 9] = keep[2, 5] = keep[2, 11] = True
    monkeypatch.setattr(compat, "BOOLEAN_LOGITS_TO_KEEP", boolean)
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits[keep]
        got = compat.masked_logits(_FullLogits(model), keep, input_ids=ids, attention_mask=mask)
    assert got.shape == reference.shape == (5, model.config.vocab_size)
    torch.testing.assert_close(got, reference, rtol=0, atol=0)
