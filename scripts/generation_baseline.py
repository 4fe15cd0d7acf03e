"""Generation-based ranking vs the one-pass ranker on the same users (the paper's Figure 3 contrast).

    python scripts/generation_baseline.py --run runs/default --out runs/generation \
        [--config configs/experiments/generation_baseline.yaml] [--set analysis.max_users=16 ...]

--run: a reranker run directory (train_reranker.py / run_experiment.py); its model, adapter, prompt
style, data and candidates are used as trained. --config: where the analysis section comes from
(default: the run's own config.yaml); its data and reranker model must be the run's. --set applies
to both. Ranks analysis.max_users covered users of analysis.split (a seeded sample) once with the
one-pass ranker (reranker.rank_batch_size) and once per analysis.generation_modes through generate
(analysis.generation_batch_size), timing each after an untimed one-user warm-up.

Writes to --out: config.yaml, run.json, generation.json (per method: metrics at k 1/5/10/20,
seconds, seconds per user, speed ratio to the one-pass ranker; per generation mode the invalid /
duplicate / complete accounting and mean new tokens), generation.md (the tables),
generations_<mode>.jsonl (per user: raw text, parse, generated rank of the target).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from pipeline.atomic import write_json, write_jsonl, write_text
from pipeline.cli import parser, run_main
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.metrics import candidate_rank, metrics_from_ranks
from pipeline.rundir import RunDir
from rerank.evaluate import RERANK_KS
from rerank.generation import GeneratedRanking, accounting, generate_rankings
from rerank.load_run import open_run
from rerank.ranker import rank_rows

TABLE_COLUMNS = ("NDCG@5", "NDCG@10", "Recall@1", "Recall@5", "Recall@10", "MRR@10")


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], config_required=False)
    p.add_argument("--run", required=True, help="reranker run directory (train_reranker.py / run_experiment.py)")
    args = p.parse_args(argv)
    if args.resume:
        raise PipelineError("--resume does not apply to generation_baseline.py (nothing is trained): drop it")
    run = open_run(args.run, args.overrides)
    cfg = run.cfg
    if args.config:
        given = load_config(args.config, args.overrides)
        for name, a, b in (("data", given.data, cfg.data), ("reranker.model", given.reranker.model, cfg.reranker.model)):
            if a != b:
                raise PipelineError(
                    f"--config {args.config} has another {name} than the run {args.run}: pass the run's config "
                    "(or omit --config) so the analysis uses the data and model the adapter was trained on"
                )
        cfg = dataclasses.replace(cfg, analysis=given.analysis)
    ana = cfg.analysis
    modes = list(dict.fromkeys(ana.generation_modes))
    out = RunDir(args.out).start(cfg, argv)

    rows = run.covered_rows(ana.split, ana.max_users)
    if not rows:
        raise PipelineError(f"no covered {ana.split} users in {args.run}: nothing to rank")
    model, tokenizer, style = run.load_model()
    titles = run.titles
    print(f"generation baseline: {len(rows)} covered {ana.split} users, model {cfg.reranker.model}, "
          f"labels {style.scheme.name}, modes {', '.join(modes)}")

    # Untimed warm-up on one user: one-time costs (allocation, lazy init) count against no method.
    rank_rows(model, tokenizer, style, rows[:1], titles, progress=False)
    generate_rankings(model, tokenizer, style, rows[:1], titles, "greedy", progress=False)

    t0 = time.perf_counter()
    one_pass = rank_rows(model, tokenizer, style, rows, titles, batch_size=cfg.reranker.rank_batch_size, progress=False)
    one_pass_s = time.perf_counter() - t0
    n = len(rows)
    result = {
        "run": str(Path(args.run).resolve()),
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
        gens = generate_rankings(
            model, tokenizer, style, rows, titles, mode, batch_size=ana.generation_batch_size, progress=False
        )
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
        write_jsonl(out / f"generations_{mode}.jsonl", [_record(row, g) for row, g in zip(rows, gens)])
    write_json(out / "generation.json", result)
    table = markdown(result)
    write_text(out / "generation.md", table)
    out.finish()
    print(table)


def _metrics(rows: Sequence[Mapping[str, Any]], scores: Sequence[Sequence[float]]) -> dict[str, float]:
    """Metrics at RERANK_KS of each row's target ranked by `scores` (ties: retriever order)."""
    ranks = [candidate_rank(s, row["candidates"], row["target"]) for row, s in zip(rows, scores)]
    return metrics_from_ranks(ranks, RERANK_KS)


def _record(row: Mapping[str, Any], gen: GeneratedRanking) -> dict[str, Any]:
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
        "| method | " + " | ".join(cols) + " | s/user | time vs one-pass |",
        "|---" * (len(cols) + 3) + "|",
        "| Retriever order | " + " | ".join(f"{result['retriever']['metrics'][c]:.4f}" for c in cols) + " | - | - |",
        "| One-pass ranker | " + " | ".join(f"{one['metrics'][c]:.4f}" for c in cols)
        + f" | {one['seconds_per_user']:.4f} | 1.0x |",
    ]
    for mode, sec in result["generation"].items():
        lines.append(
            f"| Generate ({mode}) | " + " | ".join(f"{sec['metrics'][c]:.4f}" for c in cols)
            + f" | {sec['seconds_per_user']:.4f} | {sec['speed_ratio']:.1f}x |"
        )
    lines += [
        "",
        "| mode | answered | complete | users with invalid | invalid pieces | users with duplicates | "
        "duplicate labels | truncated | mean labels | mean new tokens |",
        "|---" * 10 + "|",
    ]
    for mode, sec in result["generation"].items():
        a = sec["accounting"]
        lines.append(
            f"| {mode} | {a['answered']:.2%} | {a['complete']:.2%} | {a['users_with_invalid']} | {a['invalid_pieces']} | "
            f"{a['users_with_duplicates']} | {a['duplicate_labels']} | {a['truncated']} | "
            f"{a['mean_labels_parsed']:.1f} | {a['mean_new_tokens']:.1f} |"
        )
    lines += [
        "",
        "Generated rankings: the parsed labels first, in the model's order; unnamed candidates after them in "
        "retriever order (greedy: only its first label is placed). Times include prompt building.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
