"""The reranker's speed and memory claims, each a ratio measured in one run (scripts/benchmark.py).

Every figure compares our path with a baseline on the same model, the same prompts and the same
batches, timed interleaved (ours, baseline, ours, ...) after warm-up runs, median of the repeats:

- ranking_overhead: `rerank.ranker.rank_rows` (prompt building, tokenizing, length-sorted batching,
  scoring) vs the floor: a bare `model(input_ids, attention_mask, logits_to_keep=1, use_cache=False)`
  under inference_mode over the same prompts, already tokenized and padded into the same batches.
  The prompt building alone (`encode_rows`) is timed beside them.
- generation_speedup: one-pass ranking (the same `rank_rows` runs) vs generating a ranked list of
  every label (`rerank.generation.generate_rankings`, mode "list", at least a complete list's tokens
  decoded per user) for the same users.
- merged_vs_adapter: one-pass ranking (`rank_rows`, the same prompts and batches) with the LoRA
  merged into the weights (`rerank.export.merge_lora`, what scripts/export_model.py saves) vs the
  unmerged PeftModel (base + low-rank path at every adapted layer). Reported, no target.
- training_memory / training_time: one optimizer step (forward, loss, backward, AdamW) with the
  loss only at the supervised positions (`rerank.train.supervised_logits` + cross-entropy, as
  `RerankTrainer.compute_loss`) vs the stock causal-LM loss (`model(..., labels=...)`: logits at
  every position over the whole vocabulary), same batch, same LoRA model. Peak memory: see
  analysis/peak_memory.py; the logits tensors' sizes are reported beside it as computed figures.
- lora_layout_time: one optimizer step with reranker.loss, LoRA on every linear layer of the top N
  layers (reranker.lora_layers) vs the paper's q_proj/v_proj in every layer (and every linear layer
  everywhere, timed beside them): a fresh base model per layout, same batch.
- batching_padding / batching_time: length-ordered batches (the ranker's) vs arrival order (file
  order): exact padding token counts, and the ranker's scorer timed on both batchings.

The model is the untrained base with a fresh LoRA adapter (speed does not depend on the adapter's
values); `random_architecture` builds a random-init Qwen2.5-size model with the real Qwen2
tokenizer instead, for GPU measurements without a hub.
"""
from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from analysis import peak_memory
from pipeline.candidates import candidates_path, read_rows
from pipeline.config import Config
from pipeline.data import load_dataset
from pipeline.data.dataset import SplitDataset, titles_by_item
from pipeline.device import resolve_device
from pipeline.errors import PipelineError
from rerank.inference.generation import generate_rankings
from rerank.inference.ranker import encode_rows, length_ordered_batches, rank_rows, score_prompts
from rerank.model.adapter import add_lora, merge_lora
from rerank.model.sources import load_from_config, load_tokenizer, resolve_dtype
from rerank.model.standins import TINY_QWEN2
from rerank.prompting.prompts import label_tokens
from rerank.prompting.style import PromptStyle, style_from_config
from rerank.training.collate import TrainingTexts, collator_for
from rerank.training.loss import labels_loss_sum, supervised_logits
from rerank.training.samples import samples_from_config

# Targets (issue 5): our ranking path within 15% of a bare forward; one pass >= 20x faster than
# generating a list (on tiny-qwen2, whose decoding never stops early); the answer-only loss at most
# half the stock loss's peak memory; length ordering never pads more than arrival order.
RANKING_OVERHEAD_MAX = 1.15
GENERATION_SPEEDUP_MIN = 20.0
GENERATION_TARGET_MODELS = (TINY_QWEN2,)  # elsewhere the speed-up is reported without a target
TRAINING_MEMORY_MAX = 0.5
PADDING_MAX = 1.0

# Random-init architectures (`random_architecture`), sized as the released Qwen2.5 base models'
# config.json files; with the real Qwen2 tokenizer (vocab_size is the padded embedding size).
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, tie_word_embeddings=False, vocab_size=152064),
}


@dataclass(frozen=True)
class BenchmarkSettings:
    users: int = 32  # users (rows of `split`) ranked; a seeded uniform sample
    split: str = "test"  # candidates split the prompts come from
    warmup: int = 1  # untimed runs of each variant before the timed ones
    repeats: int = 5  # timed runs of each variant; figures use the median
    generation_repeats: int = 3  # timed rounds of (generation, rank_rows); generation is the slow part
    rss_check: bool = True  # also measure the training step's RSS peak in fresh subprocesses (CPU)
    architecture: Optional[str] = None  # random-init ARCHITECTURES entry instead of reranker.model

    def validate(self) -> None:
        if self.users < 1:
            raise PipelineError(f"--users must be >= 1 (got {self.users})")
        if self.split not in ("train", "val", "test"):
            raise PipelineError(f"--split must be train, val or test (got {self.split!r})")
        if self.warmup < 0:
            raise PipelineError(f"--warmup must be >= 0 (got {self.warmup})")
        if self.repeats < 1 or self.generation_repeats < 1:
            raise PipelineError("--repeats and --generation-repeats must be >= 1")
        if self.architecture is not None and self.architecture not in ARCHITECTURES:
            raise PipelineError(f"unknown --architecture {self.architecture!r}: use one of {', '.join(ARCHITECTURES)}")


# ----------------------------------------------------------------------------------------
# Inputs: rows, model, training batch


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
        keep = np.random.default_rng([cfg.seed, 4]).choice(len(rows), size=settings.users, replace=False)
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


# ----------------------------------------------------------------------------------------
# Batches and padding


def arrival_batches(n: int, batch_size: int) -> list[list[int]]:
    """Batches in arrival (file) order."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def padding_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Pad tokens a batching adds: each batch is padded to its longest prompt."""
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches if b)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), left-padded as the ranker pads."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.as_tensor(np.asarray(p), dtype=torch.long)
        mask[r, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------
# Timing


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], Any]], warmup: int, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds of each timed run of each function, run in turn (a, b, a, b, ...) so that a slow
    spell of a shared machine hits every variant alike; the first `warmup` rounds are not kept."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                runs[name].append(time.perf_counter() - t0)
    return runs


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _figure(
    what: str, ratio_is: str, raw: dict[str, Any], ratio: Optional[float], target: Optional[str], passed: Optional[bool]
) -> dict[str, Any]:
    """One figure. Timed figures (ratio "x_s / y_s" with x_runs_s, y_runs_s in `raw`) also get
    `ratio_of_fastest`, min(x runs) / min(y runs): a second view for a loaded machine, where other
    work only ever adds time; pass/fail is judged on the medians' ratio."""
    num, den = ratio_is.split(" / ")
    runs = [raw.get(key[: -len("_s")] + "_runs_s") for key in (num, den)]
    fastest = _ratio(min(runs[0]), min(runs[1])) if all(runs) and num.endswith("_s") else None
    return {
        "what": what, "ratio_is": ratio_is, "ratio": ratio, "ratio_of_fastest": fastest, "target": target, "pass": passed, "raw": raw,
    }


def _reported_timing(what: str, runs: Mapping[str, list[float]], num: str, den: str) -> dict[str, Any]:
    """A timed figure without a target: median seconds of `runs[num]` over those of `runs[den]`."""
    num_s, den_s = _median(runs[num]), _median(runs[den])
    raw = {f"{num}_s": num_s, f"{den}_s": den_s, f"{num}_runs_s": runs[num], f"{den}_runs_s": runs[den]}
    return _figure(what, f"{num}_s / {den}_s", raw, _ratio(num_s, den_s), None, None)


def _ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None


# ----------------------------------------------------------------------------------------
# The figures


def ranking_figures(model, tokenizer, style, rows, titles, batch_size, settings, device) -> dict[str, Any]:
    """ranking_overhead, batching_padding, batching_time (see module doc)."""
    jobs = encode_rows(tokenizer, style, rows, titles, progress=False)
    pad_id = tokenizer.pad_token_id
    tokens = label_tokens(tokenizer, style)
    groups = {k: [ids for _, _, ids, _ in group] for k, group in jobs.items()}  # K -> prompts, file order
    floor_batches = [
        left_pad([prompts[i] for i in b], pad_id, device)
        for prompts in groups.values()
        for b in length_ordered_batches([len(p) for p in prompts], batch_size)
    ]

    def ours() -> None:
        rank_rows(model, tokenizer, style, rows, titles, batch_size=batch_size, progress=False)

    def floor() -> None:
        model.eval()
        with torch.inference_mode():
            for ids, mask in floor_batches:
                model(input_ids=ids, attention_mask=mask, logits_to_keep=1, use_cache=False)  # no cache: the least work

    def encode_only() -> None:
        encode_rows(tokenizer, style, rows, titles, progress=False)

    runs = time_interleaved({"ours": ours, "floor": floor, "encode": encode_only}, settings.warmup, settings.repeats, device)
    ours_s, floor_s = _median(runs["ours"]), _median(runs["floor"])
    ratio = _ratio(ours_s, floor_s)
    overhead = _figure(
        "ranking: rank_rows (prompts, tokenizing, batching, scoring) vs a bare forward over the same tokenized batches",
        "ours_s / floor_s",
        {"ours_s": ours_s, "floor_s": floor_s, "prompt_building_s": _median(runs["encode"]),
         "ours_runs_s": runs["ours"], "floor_runs_s": runs["floor"], "prompt_building_runs_s": runs["encode"]},
        ratio, f"<= {RANKING_OVERHEAD_MAX}", None if ratio is None else ratio <= RANKING_OVERHEAD_MAX,
    )

    # Batching: the ranker's scorer on pre-tokenized prompts, over length-ordered batches (one call,
    # it sorts) vs arrival-order batches (one call per batch, so the call cannot regroup them).
    lengths = {k: [len(p) for p in prompts] for k, prompts in groups.items()}
    pad_ours = sum(padding_tokens(lengths[k], length_ordered_batches(lengths[k], batch_size)) for k in groups)
    pad_arrival = sum(padding_tokens(lengths[k], arrival_batches(len(lengths[k]), batch_size)) for k in groups)
    real = sum(sum(v) for v in lengths.values())

    def score_ordered() -> None:
        for k, prompts in groups.items():
            score_prompts(model, prompts, tokens.for_k(k), batch_size, pad_id, progress=False)

    def score_arrival() -> None:
        for k, prompts in groups.items():
            for b in arrival_batches(len(prompts), batch_size):
                score_prompts(model, [prompts[i] for i in b], tokens.for_k(k), batch_size, pad_id, progress=False)

    bruns = time_interleaved({"ordered": score_ordered, "arrival": score_arrival}, settings.warmup, settings.repeats, device)
    pad_ratio = _ratio(pad_ours, pad_arrival)
    padding = _figure(
        "batching: pad tokens of length-ordered batches (ours) vs arrival-order batches (exact counts)",
        "padding_ours / padding_arrival",
        {"padding_ours": pad_ours, "padding_arrival": pad_arrival, "real_tokens": real,
         "padding_fraction_ours": pad_ours / (real + pad_ours), "padding_fraction_arrival": pad_arrival / (real + pad_arrival),
         "n_batches": sum(len(arrival_batches(len(v), batch_size)) for v in lengths.values())},
        pad_ratio, f"<= {PADDING_MAX}", pad_ours <= pad_arrival,
    )
    batching_time = _reported_timing(
        "batching: scoring time (rerank.ranker.score_prompts) with length-ordered vs arrival-order batches",
        bruns, "ordered", "arrival",
    )
    all_lengths = [n for v in lengths.values() for n in v]
    prompts_info = {
        "n_prompts": len(all_lengths),
        "candidates_per_prompt": sorted(groups),
        "tokens_mean": float(np.mean(all_lengths)),
        "tokens_min": int(min(all_lengths)),
        "tokens_max": int(max(all_lengths)),
    }
    return {"figures": {"ranking_overhead": overhead, "batching_padding": padding, "batching_time": batching_time},
            "prompts": prompts_info}


def generation_figure(model, tokenizer, style, rows, titles, batch_size, model_name, settings, gen_batch_size, device) -> dict[str, Any]:
    """generation_speedup: `generate_rankings(mode="list", full_list=True)` (every user decodes at
    least a complete list of labels, whatever the untrained adapter would do) vs `rank_rows` on the
    same rows, timed
    interleaved (`generation_repeats` rounds): on a shared machine, times taken at different
    moments are not comparable."""
    generated: list[Any] = []

    def ours() -> None:
        rank_rows(model, tokenizer, style, rows, titles, batch_size=batch_size, progress=False)

    def generate() -> None:
        generated[:] = generate_rankings(model, tokenizer, style, rows, titles, mode="list", batch_size=gen_batch_size, progress=False, full_list=True)

    model.eval()
    if settings.warmup:  # one small call: first-call costs, without doubling the slowest part
        generate_rankings(model, tokenizer, style, rows[:gen_batch_size], titles, mode="list", batch_size=gen_batch_size, progress=False, full_list=True)
    runs = time_interleaved({"ours": ours, "generation": generate}, 0, settings.generation_repeats, device)
    gen_s, ours_s = _median(runs["generation"]), _median(runs["ours"])
    ratio = _ratio(gen_s, ours_s)
    applies = model_name in GENERATION_TARGET_MODELS and not settings.architecture
    raw: dict[str, Any] = {"ours_s": ours_s, "generation_s": gen_s, "ours_runs_s": runs["ours"], "generation_runs_s": runs["generation"],
                           "generation_batch_size": gen_batch_size}
    raw.update(_generation_stats(generated))
    return _figure(
        "one-pass ranking (rank_rows) vs generating a ranked list of all labels (generate_rankings, mode list), same users",
        "generation_s / ours_s",
        raw,
        ratio,
        f">= {GENERATION_SPEEDUP_MIN}" if applies else None,
        (ratio is not None and ratio >= GENERATION_SPEEDUP_MIN) if applies else None,
    )


def merged_figure(model, tokenizer, style, rows, titles, batch_size, settings, device) -> dict[str, Any]:
    """merged_vs_adapter: `rank_rows` with the LoRA merged into a copy of the model vs the PeftModel
    itself, same rows and batch size, interleaved. The copy is merged so the other figures keep
    measuring the PeftModel; it is freed on return (before the training figures' memory peaks)."""
    merged = merge_lora(copy.deepcopy(model))

    def ranking(m: torch.nn.Module) -> Callable[[], Any]:
        return lambda: rank_rows(m, tokenizer, style, rows, titles, batch_size=batch_size, progress=False)

    runs = time_interleaved({"merged": ranking(merged), "adapter": ranking(model)}, settings.warmup, settings.repeats, device)
    return _reported_timing(
        "one-pass ranking (rank_rows) with the LoRA merged into the weights (scripts/export_model.py) vs the unmerged "
        "PeftModel, same prompts and batches",
        runs, "merged", "adapter",
    )


def _generation_stats(out: Any) -> dict[str, Any]:
    """What the generated answers were like (reported, never required): a list answer costs about
    one decoding step per generated token, so these explain the generation time."""
    if not out:
        return {}
    n = len(out)
    return {
        "generated_tokens_mean": sum(g.new_tokens for g in out) / n,
        "stopped_fraction": sum(g.stopped for g in out) / n,  # ended with a stop token, not the budget
        "complete_fraction": sum(g.complete for g in out) / n,  # named every label
    }


def ours_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The answer-only loss, as RerankTrainer.compute_loss computes it (token mean, one batch)."""
    logits, targets = supervised_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return F.cross_entropy(logits.float(), targets, reduction="sum") / max(targets.numel(), 1)


def stock_loss(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """transformers' causal-LM loss (`labels=`): logits at every position, the whole vocabulary.
    Given the same position ids as ours, so the two losses are equal and only their cost differs."""
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
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
    mem_ratio = _ratio(peaks["ours"], peaks["stock"])
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
            rss_ratio=_ratio(rss["ours"], rss["stock"]) if rss.get("ours") is not None and rss.get("stock") else None,
        )
    memory = _figure(
        "training step peak memory: loss at the label positions only (supervised_logits) vs stock full-sequence logits (labels=)",
        "ours_peak_bytes / stock_peak_bytes",
        raw_mem, mem_ratio, f"<= {TRAINING_MEMORY_MAX}", None if mem_ratio is None else mem_ratio <= TRAINING_MEMORY_MAX,
    )
    timing = _reported_timing(
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
    fig = _reported_timing(
        "training step time (forward, loss, backward, AdamW): LoRA on every linear layer of the top N layers vs the "
        "paper's q_proj/v_proj in every layer",
        runs, "all_linear_top", "paper",
    )
    fig["raw"].update(
        all_linear_s=_median(runs["all_linear"]), all_linear_runs_s=runs["all_linear"],
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


# ----------------------------------------------------------------------------------------
# Whole run and report


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


FIGURE_ORDER = (
    "ranking_overhead", "generation_speedup", "merged_vs_adapter", "training_memory", "training_time", "lora_layout_time",
    "batching_padding", "batching_time",
)
_FIGURE_COLUMNS = {  # figure -> (label, our raw key, baseline raw key, unit)
    "ranking_overhead": ("ranking overhead vs bare forward", "ours_s", "floor_s", "s"),
    "generation_speedup": ("generation (list) vs one pass", "ours_s", "generation_s", "s"),
    "merged_vs_adapter": ("ranking, merged LoRA vs unmerged PeftModel", "merged_s", "adapter_s", "s"),
    "training_memory": ("training step peak memory", "ours_peak_bytes", "stock_peak_bytes", "B"),
    "training_time": ("training step time", "ours_s", "stock_s", "s"),
    "lora_layout_time": ("training step time, LoRA top-N all-linear vs q/v everywhere", "all_linear_top_s", "paper_s", "s"),
    "batching_padding": ("padding tokens, length-ordered vs arrival", "padding_ours", "padding_arrival", "tok"),
    "batching_time": ("scoring time, length-ordered vs arrival", "ordered_s", "arrival_s", "s"),
}


def _fmt(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if unit == "s":
        return f"{value:.3f} s"
    if unit == "B":
        return f"{value / 2**20:.1f} MiB"
    return f"{value:,}"


def markdown(result: Mapping[str, Any]) -> str:
    """benchmark.md: the figures as a table, then what they were measured on."""
    m, s, p = result["machine"], result["settings"], result["prompts"]
    lines = [
        f"# Benchmark: {result['model']['name']}",
        "",
        "| figure | ours | baseline | ratio (definition) | target | result |",
        "|---|---|---|---|---|---|",
    ]
    for name, fig in result["figures"].items():
        label, ours_key, base_key, unit = _FIGURE_COLUMNS[name]
        ratio = "n/a" if fig["ratio"] is None else f"{fig['ratio']:.3g} ({fig['ratio_is']})"
        if fig["ratio_of_fastest"] is not None:
            ratio += f"; fastest runs {fig['ratio_of_fastest']:.3g}"
        verdict = {True: "pass", False: "FAIL", None: "reported"}[fig["pass"]]
        lines.append(
            f"| {label} | {_fmt(fig['raw'].get(ours_key), unit)} | {_fmt(fig['raw'].get(base_key), unit)} | {ratio} | "
            f"{fig['target'] or '-'} | {verdict} |"
        )
    mem = result["figures"]["training_memory"]["raw"]
    lines += [
        "",
        f"- model: {result['model']['name']} ({result['model']['class']}, {result['model']['dtype']}, "
        f"{result['model']['parameters']:,} parameters, vocabulary {result['model']['vocab_size']:,}) + fresh LoRA adapter",
        f"- machine: {m['cpu']}, {m['torch_threads']} torch threads, {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "") + f"; torch {m['torch']}, transformers {m['transformers']}, peft {m['peft']}; "
        f"load average {m['load_average_1min']['start']} at start, {m['load_average_1min']['end']} at end ({m['cpu_count']} CPUs)",
        f"- prompts: {p['n_prompts']} ({s['label_scheme']}, {p['candidates_per_prompt']} candidates), "
        f"{p['tokens_min']}-{p['tokens_max']} tokens (mean {p['tokens_mean']:.0f}); rows: {s['rows_source']}",
        f"- batches: ranking {s['rank_batch_size']}, training {s['train_batch_size']}"
        + (" (gradient checkpointing)" if s["gradient_checkpointing"] else "") + f", generation {s['generation_batch_size']}; "
        f"{s['warmup']} warm-up + median of {s['repeats']} runs ({s['generation_repeats']} for generation), variants interleaved; "
        "pass/fail on the medians' ratio, the fastest runs' ratio beside it",
        f"- training logits tensor (computed, model dtype): ours {_fmt(mem['logits_bytes_ours_computed'], 'B')} "
        f"({mem['supervised_tokens']} positions), stock {_fmt(mem['logits_bytes_stock_computed'], 'B')} "
        f"({mem['batch_size']} x {mem['sequence_length']} positions); losses {mem['loss_ours']:.5f} vs {mem['loss_stock']:.5f}",
        f"- peak memory: {mem['method']}",
    ]
    if mem.get("rss_method"):
        lines.append(
            f"- cross-check, {mem['rss_method']}: ours {_fmt(mem['rss_ours_peak_bytes'], 'B')}, "
            f"stock {_fmt(mem['rss_stock_peak_bytes'], 'B')}"
            + (f" (ratio {mem['rss_ratio']:.3g})" if mem.get("rss_ratio") is not None else "")
        )
    lines.append("- judge by the ratios: absolute times depend on the machine and its load")
    return "\n".join(lines) + "\n"
