"""The GPU training numerics, checked on CPU: the half type a GPU gets (bf16 only where it is native), the
"labels" loss under the Trainer's autocast, and a 4-bit run ranking with the model build --resume loads.
bitsandbytes NF4 needs CUDA, so the 4-bit base is tiny-qwen2 in bf16 flagged `is_loaded_in_4bit` (what
peft's prepare_model_for_kbit_training reads): its fp32 upcast of the unquantised weights is the same."""
from __future__ import annotations

import copy
import functools
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainingArguments

from rerank.model.adapter import add_lora, load_adapter
from rerank.model.sources import load_model_and_tokenizer, resolve_dtype
from rerank.model.standins import TINY_QWEN2
from rerank.prompting.labels import LETTERS
from rerank.prompting.prompts import label_tokens
from rerank.prompting.style import make_style
from rerank.training.collate import TrainingTexts, collator_for
from rerank.training.samples import build_samples
from rerank.training.stages import train_reranker
from rerank.training.rerank_trainer import RerankTrainer
from tests.helpers.data import make_ds
from tests.helpers.tokenizers import CACHE_DIR
from tests.helpers.training import cfg, fresh_model, tok


@pytest.mark.parametrize("major, half", [(7, torch.float16), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_bf16_only_where_the_gpu_has_it_natively(major, half, monkeypatch):
    """torch.cuda.is_bf16_supported() also says yes where bf16 is only emulated (V100, T4: compute
    capability 7.x, where a bf16 tensor can be made); fp16 is their half type."""
    from rerank.model.sources import mixed_precision  # the TrainingArguments flags train_reranker passes

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major, minor=0))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # emulation works
    assert resolve_dtype("auto", "cuda") is half  # the model's weights
    assert mixed_precision(True) == {"bf16": half is torch.bfloat16, "fp16": half is torch.float16}  # the Trainer's autocast
    assert mixed_precision(False) == {"bf16": False, "fp16": False}  # CPU: fp32


def test_labels_loss_runs_under_the_trainers_autocast(tmp_path):
    """accelerate autocasts the model's forward only; the labels loss calls the decoder directly
    (ranker.label_scores: model.get_decoder()), which must run under the same autocast. CPU bf16
    autocast stands in for CUDA's: the Trainer sets up both the same way."""
    ds = make_ds()
    samples = build_samples(ds, n_candidates=4, seed=0, history_len=3, max_samples=4)
    style = make_style(tok(), LETTERS, max_history=3)
    model = add_lora(fresh_model(), cfg(), seed=0)
    seen = []
    model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))),
        with_kwargs=True,
    )
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, bf16=True, max_steps=1, per_device_train_batch_size=4,
                             report_to="none", remove_unused_columns=False, label_names=["labels"], save_strategy="no")
    trainer = RerankTrainer(
        model=model, args=args, train_dataset=TrainingTexts(samples, ds.titles, tok(), style), data_collator=collator_for(tok()),
        loss="labels", train_tokens=label_tokens(tok(), style).for_k(4), pad_id=tok().pad_token_id,
    )
    trainer.train()
    assert seen and all(seen_ == (True, torch.bfloat16) for seen_ in seen), seen


@functools.lru_cache(maxsize=None)
def _tiny_bf16():
    return load_model_and_tokenizer(TINY_QWEN2, dtype="bfloat16", cache_dir=CACHE_DIR)[0]


def test_a_4bit_run_ranks_with_the_model_build_resume_loads(tmp_path, monkeypatch):
    """prepare_model_for_kbit_training upcasts the unquantised weights (embeddings, norms, biases, lm_head)
    to fp32 for training; --resume and rank_reranker.py load a fresh base (bf16) + the adapter. After
    training, the model the run ranks test with must be that build: same dtypes, same logits."""
    from rerank.training import trainer

    def add_lora_4bit(model, *args, **kwargs):
        """add_lora on a base flagged as NF4-loaded (so peft prepares it for kbit training), the flag dropped
        after: it would make transformers import bitsandbytes to count parameters."""
        model.is_loaded_in_4bit = True
        try:
            return add_lora(model, *args, **kwargs)
        finally:
            del model.is_loaded_in_4bit

    monkeypatch.setattr(trainer, "add_lora", add_lora_4bit)
    ds = make_ds()
    samples = build_samples(ds, n_candidates=4, seed=0, history_len=3, max_samples=8)
    style = make_style(tok(), LETTERS, max_history=3)
    model = copy.deepcopy(_tiny_bf16())
    trained = []
    real_train = RerankTrainer.train
    monkeypatch.setattr(RerankTrainer, "train", lambda self, **kw: trained.append(
        {n: p.dtype for n, p in self.model.get_base_model().named_parameters()}) or real_train(self, **kw))
    train_reranker(model, tok(), style, ds, samples, [], cfg(num_epochs=1), tmp_path, seed=0)
    assert trained[0]["model.norm.weight"] is torch.float32  # peft's kbit preparation ran: training saw fp32
    resumed = load_adapter(copy.deepcopy(_tiny_bf16()), tmp_path)

    in_run = {n: p.dtype for n, p in model.named_parameters()}
    assert in_run == {n: p.dtype for n, p in resumed.get_base_model().named_parameters()}
    assert in_run["model.embed_tokens.weight"] is torch.bfloat16 and in_run["model.norm.weight"] is torch.bfloat16
    batch = collator_for(tok())([TrainingTexts(samples, ds.titles, tok(), style)[i] for i in range(4)])
    kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        assert torch.equal(model.eval()(**kw).logits, resumed(**kw).logits)
