"""A whole benchmark run (`run_benchmark`): every figure, with the model, machine, prompts and
settings they were measured with."""
from __future__ import annotations

import dataclasses
import os
import platform
from typing import Any, Optional

import torch

from analysis.benchmark.inputs import benchmark_rows, load_lora_model, training_batch
from analysis.benchmark.ranking import generation_figure, merged_figure, ranking_figures
from analysis.benchmark.settings import FIGURE_ORDER, BenchmarkSettings
from analysis.benchmark.training import layout_loss, lora_layout_figure, rss_step_peak, training_figures
from pipeline.config import Config
from pipeline.data import load_dataset
from pipeline.data.dataset import titles_by_item
from rerank.prompting.style import style_from_config


def machine_info(device: str) -> dict[str, Any]:
    """CPU model, threads, library versions, GPU: what the absolute times depend on."""
    import peft
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _load_average() -> Optional[float]:
    """The 1-minute load average: above the core count, other work shared the CPUs during the run."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_benchmark(cfg: Config, settings: BenchmarkSettings) -> dict[str, Any]:
    """Every figure, with the model, machine, prompts and settings they were measured with."""
    settings.validate()
    load_start = _load_average()
    ds = load_dataset(cfg.data)
    rows, source = benchmark_rows(cfg, ds, settings)
    titles = titles_by_item(ds)
    model, tokenizer, model_name = load_lora_model(cfg, settings.architecture)
    style = style_from_config(cfg.reranker, tokenizer)
    device = str(next(model.parameters()).device)
    batch_size = cfg.reranker.rank_batch_size

    ranking = ranking_figures(model, tokenizer, style, rows, titles, batch_size, settings, device)
    figures = dict(ranking["figures"])
    figures["generation_speedup"] = generation_figure(
        model, tokenizer, style, rows, titles, batch_size, model_name, settings,
        cfg.analysis.generation_batch_size, device,
    )
    figures["merged_vs_adapter"] = merged_figure(model, tokenizer, style, rows, titles, batch_size, settings, device)
    batch = training_batch(cfg, ds, tokenizer, style, device)
    rss = rss_step_peak(cfg, settings.architecture) if settings.rss_check and not device.startswith("cuda") else None
    figures.update(training_figures(model, batch, settings, device, rss))
    n_layers = int(model.get_base_model().config.num_hidden_layers)
    loss_fn = layout_loss(cfg, tokenizer, style, cfg.reranker.train_candidates)
    figures["lora_layout_time"] = lora_layout_figure(cfg, settings, batch, loss_fn, device, n_layers)

    base = model.get_base_model()
    return {
        "model": {
            "name": model_name,
            "class": type(base).__name__,
            "dtype": str(next(base.parameters()).dtype).replace("torch.", ""),
            "parameters": sum(p.numel() for p in base.parameters()),
            "lora_trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
            "vocab_size": int(base.config.vocab_size),
        },
        "machine": {**machine_info(device), "load_average_1min": {"start": load_start, "end": _load_average()}},
        "settings": {
            **dataclasses.asdict(settings),
            "rank_batch_size": batch_size,
            "train_batch_size": cfg.reranker.train_batch_size,
            "gradient_checkpointing": cfg.reranker.gradient_checkpointing,
            "generation_batch_size": cfg.analysis.generation_batch_size,
            "label_scheme": style.scheme.name,
            "rows_source": source,
            "n_rows": len(rows),
        },
        "prompts": ranking["prompts"],
        "figures": {name: figures[name] for name in FIGURE_ORDER},
    }
