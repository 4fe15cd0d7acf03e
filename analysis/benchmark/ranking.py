"""The ranking figures: ranking_overhead and batching (vs a bare forward, vs arrival order),
generation_speedup (vs generating a ranked list), merged_vs_adapter (merged LoRA vs PeftModel)."""
from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import numpy as np
import torch

from analysis.benchmark.settings import GENERATION_SPEEDUP_MIN, GENERATION_TARGET_MODELS, PADDING_MAX, RANKING_OVERHEAD_MAX
from analysis.benchmark.timing import make_figure, median, reported_timing, safe_ratio, time_interleaved
from rerank.inference.generation import generate_rankings
from rerank.inference.ranker import encode_rows, length_ordered_batches, pad_left, rank_rows, score_prompts
from rerank.model.adapter import merge_lora
from rerank.prompting.prompts import label_tokens


def arrival_batches(n: int, batch_size: int) -> list[list[int]]:
    """Batches in arrival (file) order."""
    return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]


def padding_tokens(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> int:
    """Pad tokens a batching adds: each batch is padded to its longest prompt."""
    return sum(len(b) * max(lengths[i] for i in b) - sum(lengths[i] for i in b) for b in batches if b)


def ranking_figures(model, tokenizer, style, rows, titles, batch_size, settings, device) -> dict[str, Any]:
    """ranking_overhead, batching_padding, batching_time (see module doc)."""
    jobs = encode_rows(tokenizer, style, rows, titles, progress=False)
    pad_id = tokenizer.pad_token_id
    tokens = label_tokens(tokenizer, style)
    groups = {k: [ids for _, _, ids, _ in group] for k, group in jobs.items()}  # K -> prompts, file order
    floor_batches = [
        pad_left([prompts[i] for i in b], pad_id, device)
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
    ours_s, floor_s = median(runs["ours"]), median(runs["floor"])
    ratio = safe_ratio(ours_s, floor_s)
    overhead = make_figure(
        "ranking: rank_rows (prompts, tokenizing, batching, scoring) vs a bare forward over the same tokenized batches",
        "ours_s / floor_s",
        {"ours_s": ours_s, "floor_s": floor_s, "prompt_building_s": median(runs["encode"]),
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
    pad_ratio = safe_ratio(pad_ours, pad_arrival)
    padding = make_figure(
        "batching: pad tokens of length-ordered batches (ours) vs arrival-order batches (exact counts)",
        "padding_ours / padding_arrival",
        {"padding_ours": pad_ours, "padding_arrival": pad_arrival, "real_tokens": real,
         "padding_fraction_ours": pad_ours / (real + pad_ours), "padding_fraction_arrival": pad_arrival / (real + pad_arrival),
         "n_batches": sum(len(arrival_batches(len(v), batch_size)) for v in lengths.values())},
        pad_ratio, f"<= {PADDING_MAX}", pad_ours <= pad_arrival,
    )
    batching_time = reported_timing(
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
    gen_s, ours_s = median(runs["generation"]), median(runs["ours"])
    ratio = safe_ratio(gen_s, ours_s)
    applies = model_name in GENERATION_TARGET_MODELS and not settings.architecture
    raw: dict[str, Any] = {"ours_s": ours_s, "generation_s": gen_s, "ours_runs_s": runs["ours"], "generation_runs_s": runs["generation"],
                           "generation_batch_size": gen_batch_size}
    raw.update(_generation_stats(generated))
    return make_figure(
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
    return reported_timing(
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
