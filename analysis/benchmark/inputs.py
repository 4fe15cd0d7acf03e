"""The benchmark's inputs: the users' candidate rows, the model with a fresh LoRA adapter (or a
random-init architecture), and one training batch as the Trainer gets it."""
from __future__ import annotations

import dataclasses
from typing import Optional

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from analysis.benchmark.settings import ARCHITECTURES, BenchmarkSettings
from pipeline import rng_streams
from pipeline.candidates import candidates_path, read_rows
from pipeline.config import Config
from pipeline.data.dataset import SplitDataset
from pipeline.device import resolve_device
from pipeline.errors import PipelineError
from rerank.model.adapter import add_lora
from rerank.model.sources import load_from_config, load_tokenizer, resolve_dtype
from rerank.model.standins import TINY_QWEN2
from rerank.prompting.style import PromptStyle
from rerank.training.collate import TrainingTexts, collator_for
from rerank.training.samples import samples_from_config


def benchmark_rows(cfg: Config, ds: SplitDataset, settings: BenchmarkSettings) -> tuple[list[dict], str]:
    """(rows, where they came from): `settings.users` rows of the split's candidates, a seeded
    uniform sample in file order. From `cfg.retriever_run`'s candidates file when set, else from a
    popularity retriever fitted here (so the benchmark runs standalone). Every user's row counts,
    covered or not: a prompt costs the same whether the target is among its candidates."""
    if cfg.retriever_run:
        path = candidates_path(cfg.retriever_run, settings.split)
        rows, source = read_rows(path, set(ds.item_ids[1:])), f"retriever_run {path}"
    else:
        from retrieval.candidates import retrieve
        from retrieval.popularity import PopularityRetriever

        pop = PopularityRetriever(ds.n_items)
        pop.fit(ds, cfg.retriever, cfg.seed, None)
        rows, _ = retrieve(pop.score, ds, settings.split, cfg.retriever.top_k)
        source = f"popularity top-{cfg.retriever.top_k} of {ds.name} (no retriever_run given)"
    rows = [r for r in rows if r["candidates"]]
    if not rows:
        raise PipelineError(f"no {settings.split} rows with candidates to benchmark: check the data / retriever_run")
    if len(rows) > settings.users:
        keep = np.random.default_rng([cfg.seed, rng_streams.BENCHMARK_USERS]).choice(len(rows), size=settings.users, replace=False)
        rows = [rows[i] for i in sorted(keep.tolist())]
    return rows, source


def random_architecture(cfg: Config, name: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A random-init Qwen2ForCausalLM shaped like ARCHITECTURES[name] with the real Qwen2 tokenizer
    (tiny-qwen2's), on reranker.device in reranker.dtype ("auto": bf16 on a GPU, fp32 on CPU)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if name not in ARCHITECTURES:
        raise PipelineError(f"unknown architecture {name!r}: use one of {', '.join(ARCHITECTURES)}")
    tokenizer = load_tokenizer(TINY_QWEN2, cache_dir=cfg.reranker.model_cache_dir)
    device = resolve_device(cfg.reranker.device)
    dtype = resolve_dtype(cfg.reranker.dtype, device)
    config = Qwen2Config(
        **ARCHITECTURES[name],
        max_position_embeddings=32768,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(cfg.seed)
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def load_lora_model(cfg: Config, architecture: Optional[str]) -> tuple[torch.nn.Module, PreTrainedTokenizerBase, str]:
    """(the base model with a fresh LoRA adapter, tokenizer, model name as reported)."""
    if architecture:
        base, tokenizer = random_architecture(cfg, architecture)
        name = f"random-init {architecture} (Qwen2 tokenizer)"
    else:
        base, tokenizer = load_from_config(cfg.reranker)
        name = cfg.reranker.model
    if cfg.reranker.gradient_checkpointing:  # as the Trainer runs it (rerank/train.py); active in training mode only
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return add_lora(base, cfg.reranker, cfg.seed), tokenizer, name


def training_batch(
    cfg: Config, ds: SplitDataset, tokenizer: PreTrainedTokenizerBase, style: PromptStyle, device: str
) -> dict[str, torch.Tensor]:
    """One training batch as the Trainer gets it: `reranker.train_batch_size` seeded training
    samples (random negatives), encoded and left-padded by rerank/collate.py."""
    rcfg = dataclasses.replace(cfg.reranker, max_train_samples=cfg.reranker.train_batch_size, train_negatives="random")
    samples = samples_from_config(ds, rcfg, cfg.seed)
    texts = TrainingTexts(samples, ds.titles, tokenizer, style, rcfg.supervise_end_of_turn)
    batch = collator_for(tokenizer)([texts[i] for i in range(len(texts))])
    return {k: v.to(device) for k, v in batch.items()}
