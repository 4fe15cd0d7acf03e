"""The training figures: training_memory and training_time (the answer-only loss vs the stock
causal-LM loss), lora_layout_time (LoRA placements), and the RSS cross-check in fresh processes."""
from __future__ import annotations

import dataclasses
import multiprocessing
from typing import Any, Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from analysis import peak_memory
from analysis.benchmark.inputs import load_lora_model, training_batch
from analysis.benchmark.settings import TRAINING_MEMORY_MAX
from analysis.benchmark.timing import make_figure, median, reported_timing, safe_ratio, time_interleaved
from pipeline.config import Config
from pipeline.data import load_dataset
from pipeline.errors import PipelineError
from rerank.model.readout import padded_positions
from rerank.prompting.prompts import label_tokens
from rerank.prompting.style import PromptStyle, style_from_config
from rerank.training.loss import labels_loss_sum, supervised_logits


def ours_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The answer-only loss, as RerankTrainer.compute_loss computes it (token mean, one batch)."""
    logits, targets = supervised_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(targets.numel(), 1)


def stock_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """transformers' causal-LM loss (`labels=`): logits at every position, the whole vocabulary.
    Given the same position ids as ours, so the two losses are equal and only their cost differs."""
    positions = padded_positions(batch["attention_mask"])
    return model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions,
        labels=batch["labels"], use_cache=False,
    ).loss


LOSSES: dict[str, Callable[[torch.nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]] = {"ours": ours_loss, "stock": stock_loss}


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    # lr 0: the step does all of AdamW's work but leaves the weights (and so later figures) as they were.
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)


def _train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, loss_fn, batch) -> None:
    model.train()
    loss = loss_fn(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def training_figures(model, batch, settings, device, rss: Optional[dict[str, Optional[int]]]) -> dict[str, Any]:
    """training_memory and training_time (see module doc). `rss`: variant -> RSS peak bytes from
    fresh subprocesses (`rss_step_peak`), or None when not measured."""
    opt = _optimizer(model)
    model.eval()
    with torch.no_grad():  # the two losses agree (dropout off): the comparison is like for like
        loss_values = {name: float(fn(model, batch)) for name, fn in LOSSES.items()}
    steps = {name: (lambda fn=fn: _train_step(model, opt, fn, batch)) for name, fn in LOSSES.items()}
    runs = time_interleaved(steps, max(settings.warmup, 1), settings.repeats, device)  # >= 1 warm-up: AdamW state exists
    peaks = {name: peak_memory.tensor_peak_bytes(step, device) for name, step in steps.items()}
    model.eval()

    b, length = batch["input_ids"].shape
    n = int((batch["labels"][:, 1:] != -100).sum())
    vocab = int(model.config.vocab_size)
    elem = next(model.parameters()).element_size()
    mem_ratio = safe_ratio(peaks["ours"], peaks["stock"])
    raw_mem: dict[str, Any] = {
        "ours_peak_bytes": peaks["ours"],
        "stock_peak_bytes": peaks["stock"],
        "method": peak_memory.CUDA_METHOD if device.startswith("cuda") else peak_memory.CPU_METHOD,
        "batch_size": b,
        "sequence_length": length,
        "supervised_tokens": n,
        "vocab_size": vocab,
        "logits_bytes_ours_computed": n * vocab * elem,
        "logits_bytes_stock_computed": b * length * vocab * elem,
        "loss_ours": loss_values["ours"],
        "loss_stock": loss_values["stock"],
    }
    if rss is not None:
        raw_mem.update(
            rss_ours_peak_bytes=rss.get("ours"), rss_stock_peak_bytes=rss.get("stock"), rss_method=peak_memory.RSS_METHOD,
            rss_ratio=safe_ratio(rss["ours"], rss["stock"]) if rss.get("ours") is not None and rss.get("stock") else None,
        )
    memory = make_figure(
        "training step peak memory: loss at the label positions only (supervised_logits) vs stock full-sequence logits (labels=)",
        "ours_peak_bytes / stock_peak_bytes",
        raw_mem, mem_ratio, f"<= {TRAINING_MEMORY_MAX}", None if mem_ratio is None else mem_ratio <= TRAINING_MEMORY_MAX,
    )
    timing = reported_timing(
        "training step time (forward, loss, backward, AdamW): label positions only vs stock full-sequence logits",
        runs, "ours", "stock",
    )
    return {"training_memory": memory, "training_time": timing}


def lora_layouts(cfg: Config, n_layers: int) -> dict[str, Any]:
    """The LoRA placements timed by `lora_layout_figure`: the paper's (q_proj, v_proj in every
    layer), every linear layer, and every linear layer of the top N only (N = reranker.lora_layers,
    else a quarter of the layers), as RerankerConfigs."""
    top = cfg.reranker.lora_layers or max(1, n_layers // 4)
    base = cfg.reranker
    return {
        "paper": dataclasses.replace(base, lora_target_modules=["q_proj", "v_proj"], lora_layers=None),
        "all_linear": dataclasses.replace(base, lora_target_modules="all-linear", lora_layers=None),
        "all_linear_top": dataclasses.replace(base, lora_target_modules="all-linear", lora_layers=top),
    }


def layout_loss(cfg: Config, tokenizer: PreTrainedTokenizerBase, style: PromptStyle, k: int) -> Callable:
    """The training loss reranker.loss names, as RerankTrainer computes it for one batch (mean)."""
    if cfg.reranker.loss == "vocab":
        return ours_loss
    tokens = label_tokens(tokenizer, style).for_k(k)

    def labels(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = labels_loss_sum(
            model, batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["target_index"], tokens, tokenizer.pad_token_id
        )
        return total / batch["target_index"].numel()

    return labels


def lora_layout_figure(
    cfg: Config, settings: Any, batch: Mapping[str, torch.Tensor], loss_fn: Callable, device: str, n_layers: int
) -> dict[str, Any]:
    """lora_layout_time: one optimizer step (forward, reranker.loss, backward, AdamW) with LoRA in
    the top N layers' linear layers vs the paper's q_proj/v_proj in every layer (every linear layer
    in every layer timed beside them), same batch, a fresh base model per layout, interleaved.
    Backward stops at the lowest layer that holds a trainable weight, so the top-N step skips most
    of it."""
    models = {}
    for name, rcfg in lora_layouts(cfg, n_layers).items():
        models[name] = load_lora_model(dataclasses.replace(cfg, reranker=rcfg), settings.architecture)[0]
    opts = {name: _optimizer(m) for name, m in models.items()}
    steps = {name: (lambda name=name: _train_step(models[name], opts[name], loss_fn, batch)) for name in models}
    runs = time_interleaved(steps, max(settings.warmup, 1), settings.repeats, device)
    fig = reported_timing(
        "training step time (forward, loss, backward, AdamW): LoRA on every linear layer of the top N layers vs the "
        "paper's q_proj/v_proj in every layer",
        runs, "all_linear_top", "paper",
    )
    fig["raw"].update(
        all_linear_s=median(runs["all_linear"]), all_linear_runs_s=runs["all_linear"],
        top_layers=lora_layouts(cfg, n_layers)["all_linear_top"].lora_layers, n_layers=n_layers, loss=cfg.reranker.loss,
        trainable_parameters={name: sum(p.numel() for p in m.parameters() if p.requires_grad) for name, m in models.items()},
    )
    return fig


# ----------------------------------------------------------------------------------------
# RSS in fresh subprocesses


def _rss_worker(cfg: Config, architecture: Optional[str], variant: str, queue: Any) -> None:
    try:
        model, tokenizer, _ = load_lora_model(cfg, architecture)
        style = style_from_config(cfg.reranker, tokenizer)
        device = str(next(model.parameters()).device)
        batch = training_batch(cfg, load_dataset(cfg.data), tokenizer, style, device)
        opt = _optimizer(model)
        queue.put(("ok", peak_memory.rss_peak_delta_bytes(lambda: _train_step(model, opt, LOSSES[variant], batch))))
    except BaseException as e:  # reported to the parent as one line
        queue.put(("error", f"{type(e).__name__}: {e}"))


def rss_step_peak(cfg: Config, architecture: Optional[str]) -> dict[str, Optional[int]]:
    """variant -> RSS peak bytes of its first training step, each in a fresh spawned process (so
    malloc holds no memory freed by an earlier step); None where the OS cannot measure it."""
    ctx = multiprocessing.get_context("spawn")
    out: dict[str, Optional[int]] = {}
    for variant in LOSSES:
        queue = ctx.Queue()
        proc = ctx.Process(target=_rss_worker, args=(cfg, architecture, variant, queue))
        proc.start()
        status, value = queue.get()
        proc.join()
        if status != "ok":
            raise PipelineError(f"the RSS measurement subprocess ({variant}) failed: {value}")
        out[variant] = value
    return out
