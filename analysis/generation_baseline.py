"""Generation-based ranking vs the one-pass ranker on the same users (the paper's Figure 3 contrast).

The same fine-tuned model ranks the same covered users twice: once with the one-pass ranker
(rerank.ranker: label logits at the last position, one forward pass per prompt) and once per
generation mode through transformers' generate (rerank.generation), each timed after an untimed
one-user warm-up. Generated answers are parsed with an accounting of invalid and duplicate labels.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.atomic import write_json, write_jsonl, write_text
from pipeline.config import Config
from pipeline.markdown import markdown_table
from pipeline.metrics import candidate_rank, metrics_from_ranks
from rerank.evaluation.metrics import RERANK_KS
from rerank.inference.generation import GeneratedRanking, accounting, generate_rankings
from rerank.inference.ranker import rank_rows

TABLE_COLUMNS = ("NDCG@5", "NDCG@10", "Recall@1", "Recall@5", "Recall@10", "MRR@10")


def compare_generation(
    cfg: Config, run_path: Path, model: Any, tokenizer: Any, style: Any,
    rows: Sequence[Mapping[str, Any]], titles: Mapping[str, str], out: Path,
) -> dict[str, Any]:
    """Rank `rows` with the one-pass ranker and each of cfg.analysis.generation_modes; write
    generations_<mode>.jsonl, generation.json and generation.md into `out`; returns generation.json."""
    ana = cfg.analysis
    modes = list(dict.fromkeys(ana.generation_modes))
    # Untimed warm-up on one user: one-time costs (allocation, lazy init) count against no method.
    rank_rows(model, tokenizer, style, rows[:1], titles, progress=False)
    generate_rankings(model, tokenizer, style, rows[:1], titles, "greedy", progress=False)

    t0 = time.perf_counter()
    # Progress bars on both timed methods alike (tqdm costs microseconds per batch).
    one_pass = rank_rows(model, tokenizer, style, rows, titles, batch_size=cfg.reranker.rank_batch_size, progress=True)
    one_pass_s = time.perf_counter() - t0
    n = len(rows)
    result: dict[str, Any] = {
        "run": str(Path(run_path).resolve()),
        "split": ana.split,
        "n_users": n,
        "model": cfg.reranker.model,
        "label_scheme": style.scheme.name,
        "retriever": {"metrics": _metrics(rows, [list(range(len(r["candidates"]), 0, -1)) for r in rows])},
        "one_pass": {
            "metrics": _metrics(rows, one_pass),
            "seconds": one_pass_s,
            "seconds_per_user": one_pass_s / n,
            "batch_size": cfg.reranker.rank_batch_size,
        },
        "generation": {},
    }
    for mode in modes:
        t0 = time.perf_counter()
        gens = generate_rankings(model, tokenizer, style, rows, titles, mode, batch_size=ana.generation_batch_size, progress=True)
        seconds = time.perf_counter() - t0
        result["generation"][mode] = {
            "metrics": _metrics(rows, [g.scores for g in gens]),
            "seconds": seconds,
            "seconds_per_user": seconds / n,
            "speed_ratio": seconds / one_pass_s,  # generate time / one-pass time on the same users
            "batch_size": ana.generation_batch_size,
            "n_users": n,
            "accounting": accounting(gens),
        }
        write_jsonl(out / f"generations_{mode}.jsonl", [record(row, g) for row, g in zip(rows, gens)])
    write_json(out / "generation.json", result)
    write_text(out / "generation.md", markdown(result))
    return result


def _metrics(rows: Sequence[Mapping[str, Any]], scores: Sequence[Sequence[float]]) -> dict[str, float]:
    """Metrics at RERANK_KS of each row's target ranked by `scores` (ties: retriever order)."""
    ranks = [candidate_rank(s, row["candidates"], row["target"]) for row, s in zip(rows, scores)]
    return metrics_from_ranks(ranks, RERANK_KS)


def record(row: Mapping[str, Any], gen: GeneratedRanking) -> dict[str, Any]:
    """One line of generations_<mode>.jsonl: the answer, its parse, and the target's generated rank."""
    return {
        **gen.to_dict(),
        "target": row["target"],
        "target_label_index": row["candidates"].index(row["target"]),
        "rank": candidate_rank(gen.scores, row["candidates"], row["target"]),
    }


def markdown(result: Mapping[str, Any]) -> str:
    """Quality and time per user of each method, then each generation mode's answer accounting."""
    cols = TABLE_COLUMNS
    one = result["one_pass"]
    lines = [
        f"# Generation vs one-pass ranking: {result['model']} ({result['label_scheme']}), "
        f"{result['n_users']} covered {result['split']} users",
        "",
    ]
    quality = [
        ["Retriever order", *(f"{result['retriever']['metrics'][c]:.4f}" for c in cols), "-", "-"],
        ["One-pass ranker", *(f"{one['metrics'][c]:.4f}" for c in cols), f"{one['seconds_per_user']:.4f}", "1.0x"],
    ]
    for mode, sec in result["generation"].items():
        quality.append([f"Generate ({mode})", *(f"{sec['metrics'][c]:.4f}" for c in cols), f"{sec['seconds_per_user']:.4f}",
                        f"{sec['speed_ratio']:.1f}x"])
    lines.append(markdown_table(["method", *cols, "s/user", "time vs one-pass"], quality))
    accounting = []
    for mode, sec in result["generation"].items():
        a = sec["accounting"]
        accounting.append([
            mode, f"{a['answered']:.2%}", f"{a['complete']:.2%}", a["users_with_invalid"], a["invalid_pieces"],
            a["users_with_duplicates"], a["duplicate_labels"], a["truncated"], f"{a['mean_labels_parsed']:.1f}",
            f"{a['mean_new_tokens']:.1f}",
        ])
    header = ["mode", "answered", "complete", "users with invalid", "invalid pieces", "users with duplicates",
              "duplicate labels", "truncated", "mean labels", "mean new tokens"]
    lines += ["", markdown_table(header, accounting)]
    lines += [
        "",
        "Generated rankings: the parsed labels first, in the model's order; unnamed candidates after them in "
        "retriever order (greedy: only its first label is placed). Times include prompt building.",
    ]
    return "\n".join(lines) + "\n"
