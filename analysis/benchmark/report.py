"""benchmark.md: the figures as a table, then what they were measured on."""
from __future__ import annotations

from typing import Any, Mapping

from pipeline.markdown import markdown_table

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
    rows = []
    for name, fig in result["figures"].items():
        label, ours_key, base_key, unit = _FIGURE_COLUMNS[name]
        ratio = "n/a" if fig["ratio"] is None else f"{fig['ratio']:.3g} ({fig['ratio_is']})"
        if fig["ratio_of_fastest"] is not None:
            ratio += f"; fastest runs {fig['ratio_of_fastest']:.3g}"
        verdict = {True: "pass", False: "FAIL", None: "reported"}[fig["pass"]]
        rows.append([label, _fmt(fig["raw"].get(ours_key), unit), _fmt(fig["raw"].get(base_key), unit), ratio,
                     fig["target"] or "-", verdict])
    header = ["figure", "ours", "baseline", "ratio (definition)", "target", "result"]
    lines = [f"# Benchmark: {result['model']['name']}", "", markdown_table(header, rows)]
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
