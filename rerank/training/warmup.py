"""The binding warm-up (reranker.binding_warmup_steps): teach the choice mechanics on an easy task first.

A small LM may not bind a candidate's content to its label. The warm-up trains the same adapter and
head, with the same prompts, loss and candidate-order re-draws, on a task whose answer is visible in
the prompt: each training prompt's target is replaced by the item that closes its history (the last
history line), placed in the target's slot. Matching a candidate's title to text seen before and
answering with that candidate's label is the binding; whether it carries over to the real task
(which candidate comes next) is what the learnability check measures (`rerank.overfit`).

The warm-up adapter is saved in <run>/binding_warmup/adapter; the real training continues it.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional, Sequence

from pipeline.config import RerankerConfig
from pipeline.errors import PipelineError
from pipeline.run_files import ADAPTER_DIR, TRAIN_SUMMARY
from rerank.training.samples import TrainSample, copy_sample
from rerank.training.trainer import train_adapter

WARMUP_DIR = "binding_warmup"  # the warm-up's own training run inside the reranker run


def copy_samples(samples: Sequence[TrainSample]) -> list[TrainSample]:
    """Each sample's copy prompt (`copy_sample`); samples without history are dropped."""
    out = [copy_sample(s) for s in samples if s.history]
    if not out:
        raise PipelineError("the binding warm-up needs training prompts with a history: lower reranker.binding_warmup_steps to 0")
    return out


def warmup_config(cfg: RerankerConfig, n_samples: int) -> RerankerConfig:
    """The warm-up's RerankerConfig: `cfg`'s recipe for binding_warmup_steps optimizer steps over
    `n_samples` copy prompts, no validation checkpoints, no stages of its own."""
    per_step = cfg.train_batch_size * cfg.grad_accum_steps
    return dataclasses.replace(
        cfg,
        num_epochs=cfg.binding_warmup_steps * per_step / n_samples,
        binding_warmup_steps=0,
        binding_mix_epochs=0.0,  # its prompts are all copies already
        pretrain_steps=0,
        eval_steps=10**9,
        resume=False,
    )


def binding_warmup_stage(
    model: Any,
    tokenizer: Any,
    style: Any,
    ds: Any,
    samples: Sequence[TrainSample],
    cfg: RerankerConfig,
    out_dir: str | Path,
    seed: int,
    init_adapter: Optional[Path],
) -> Path:
    """Train the warm-up (continuing `init_adapter`, e.g. a pre-training stage's) and return its
    adapter folder; a finished warm-up (a resumed run) is kept. `model` is left without LoRA layers."""

    out = Path(out_dir) / WARMUP_DIR
    adapter = out / ADAPTER_DIR
    if (out / TRAIN_SUMMARY).is_file() and (adapter / "adapter_config.json").is_file():
        return adapter
    copies = copy_samples(samples)
    train_adapter(
        model, tokenizer, style, ds, copies, [], warmup_config(cfg, len(copies)), out, seed=seed,
        init_adapter=init_adapter, keep_lora=False,
    )
    return adapter
