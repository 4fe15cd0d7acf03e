"""Position bias of the reranker: top-1 accuracy by the slot (A..T) the ground truth was shown in.

Input: covered candidates rows and, per row, the per-order scores `rerank.ranker.score_orders`
returns: a list of (order, slot_scores) with `order[slot]` the index in row["candidates"] of the
candidate shown in `slot` and `slot_scores[slot]` its label's score; the first order is the
retriever's, the others seeded shuffles. Three conditions are measured:

- `retriever_order`: the first order alone (what the paper ranks); the slot is the target's slot in it;
- `shuffled`: the second order alone (a seeded shuffle); the slot is the target's slot in it;
- `averaged`: each candidate's score averaged over every order (reranker.rank_permutations); the
  slot is the target's slot in the retriever order (the first order).

For each condition and slot: `n` users whose target sat in that slot, `hits` of them ranked first
(top-1 accuracy = Recall@1 = HR@1 within the slot), and `picks`: users whose top-1 candidate sat in
that slot (the model's slot preference; an unbiased model picks each slot as often as the targets
sit there). Ranks and ties follow pipeline.metrics.candidate_rank (ties: earlier candidate first),
so the overall metrics of a condition are the ones metrics.json would report for those scores.
"""
from __future__ import annotations

import csv
import io
import string
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from pipeline.atomic import write_json, write_text
from pipeline.errors import PipelineError
from pipeline.markdown import markdown_table
from pipeline.metrics import candidate_rank, metrics_from_ranks, per_user_metrics
from pipeline.significance import paired_tests
from rerank.evaluation.metrics import RERANK_KS

# Condition name -> how it is described in tables and plots.
CONDITIONS = {
    "retriever_order": "retriever order",
    "shuffled": "shuffled order",
    "averaged": "permutation-averaged",
}
# Overall metrics shown in the markdown summary (all of RERANK_KS are in the JSON).
SUMMARY_METRICS = ("Recall@1", "Recall@5", "NDCG@5", "NDCG@10", "MRR@10")
OUTPUT_FILES = ("position_bias.json", "position_bias.csv", "position_bias.md", "position_bias.png")

PerOrder = Sequence[tuple[Sequence[int], Sequence[float]]]  # one row's (order, slot_scores) pairs


def candidate_scores(order: Sequence[int], slot_scores: Sequence[float]) -> list[float]:
    """One order's scores moved from slots to candidates: out[order[slot]] = slot_scores[slot]."""
    if sorted(order) != list(range(len(order))) or len(slot_scores) != len(order):
        raise PipelineError(
            f"an order must be a permutation of the candidate indices with one score per slot (got order {list(order)}, "
            f"{len(slot_scores)} scores): pass rerank.ranker.score_orders output"
        )
    out = [0.0] * len(order)
    for slot, j in enumerate(order):
        out[j] = float(slot_scores[slot])
    return out


def averaged_scores(pairs: PerOrder) -> list[float]:
    """Each candidate's score averaged over all orders (what rank_rows returns with P orders)."""
    per = [candidate_scores(order, s) for order, s in pairs]
    return [sum(col) / len(per) for col in zip(*per)]


def _top1(scores: Sequence[float]) -> int:
    """Index of the first-ranked candidate (highest score; ties: earlier candidate, as candidate_rank)."""
    return max(range(len(scores)), key=lambda j: (scores[j], -j))


def default_labels(k: int) -> list[str]:
    """Slot names when none are given: A, B, ... (the letters scheme), numbers beyond 26 slots."""
    return list(string.ascii_uppercase[:k]) if k <= 26 else [str(i + 1) for i in range(k)]


def position_bias(
    rows: Sequence[Mapping[str, Any]],
    per_order: Sequence[PerOrder],
    labels: Optional[Sequence[str]] = None,
    ks: Sequence[int] = RERANK_KS,
) -> dict[str, Any]:
    """Per-slot top-1 accuracy and slot preference, and overall metrics, for the three conditions.

    `rows`: covered candidates rows (`candidates`, `target`); `per_order`: `score_orders` output for
    them (at least two orders per row: the retriever's and a shuffle); `labels`: the slot labels
    (default A, B, ...). Accuracy is None for a slot no target sat in."""
    if len(rows) != len(per_order):
        raise PipelineError(f"{len(rows)} rows but {len(per_order)} per-order score lists: score the same rows")
    if not rows:
        raise PipelineError("no covered users to measure position bias on: check analysis.split and analysis.max_users")
    n_slots = max(len(row["candidates"]) for row in rows)
    labels = list(labels) if labels is not None else default_labels(n_slots)
    if len(labels) < n_slots:
        raise PipelineError(f"{len(labels)} slot labels for {n_slots} slots: pass one label per slot")
    counts = {c: {"n": [0] * n_slots, "hits": [0] * n_slots, "picks": [0] * n_slots} for c in CONDITIONS}
    ranks: dict[str, list[Optional[int]]] = {c: [] for c in CONDITIONS}
    n_orders = set()
    for row, pairs in zip(rows, per_order):
        cands, target = list(row["candidates"]), row["target"]
        if target not in cands:
            raise PipelineError(f"user {row.get('user')!r}: target not among the candidates; pass covered rows only")
        if len(pairs) < 2:
            raise PipelineError("position bias needs at least two candidate orders per user: set analysis.position_permutations >= 2")
        if any(len(order) != len(cands) for order, _ in pairs):
            raise PipelineError(f"user {row.get('user')!r}: an order's length differs from its candidate count: score the same rows")
        n_orders.add(len(pairs))
        t = cands.index(target)
        first, second = pairs[0][0], pairs[1][0]
        # (scores by candidate, order whose slots count): the averaged condition uses the retriever's slots.
        views = {
            "retriever_order": (candidate_scores(*pairs[0]), first),
            "shuffled": (candidate_scores(*pairs[1]), second),
            "averaged": (averaged_scores(pairs), first),
        }
        for c, (scores, order) in views.items():
            rank = candidate_rank(scores, cands, target)
            ranks[c].append(rank)
            slot = list(order).index(t)
            counts[c]["n"][slot] += 1
            counts[c]["hits"][slot] += rank == 1
            counts[c]["picks"][list(order).index(_top1(scores))] += 1
    if len(n_orders) > 1:
        raise PipelineError(f"rows were scored with different numbers of orders {sorted(n_orders)}: score them in one call")
    n = len(rows)
    conditions = {}
    for c, cnt in counts.items():
        slots = [
            {
                "slot": s,
                "label": labels[s],
                "n": cnt["n"][s],
                "hits": cnt["hits"][s],
                "accuracy": cnt["hits"][s] / cnt["n"][s] if cnt["n"][s] else None,
                "picks": cnt["picks"][s],
                "pick_share": cnt["picks"][s] / n,
            }
            for s in range(n_slots)
        ]
        conditions[c] = {
            "description": CONDITIONS[c],
            "overall": metrics_from_ranks(ranks[c], ks),
            "vs_chance": vs_chance(ranks[c], [len(row["candidates"]) for row in rows]),
            "slots": slots,
        }
    return {
        "users": [str(row.get("user")) for row in rows],
        "n_users": n,
        "n_slots": n_slots,
        "permutations": n_orders.pop(),
        "labels": labels[:n_slots],
        "conditions": conditions,
    }


CHANCE_METRICS = ("NDCG@10", "Recall@1")  # compared with a uniformly random ranking
_CHANCE_KS = sorted({int(m.split("@")[1]) for m in CHANCE_METRICS})  # the cut-offs they need


def chance_metrics(k: int) -> dict[str, float]:
    """Expected CHANCE_METRICS of a uniformly random ranking of k candidates (the target's rank uniform on 1..k)."""
    per_rank = per_user_metrics(list(range(1, k + 1)), _CHANCE_KS)
    return {m: sum(per_rank[m]) / k for m in CHANCE_METRICS}


def vs_chance(ranks: Sequence[Optional[int]], counts: Sequence[int]) -> dict[str, Any]:
    """Per metric of CHANCE_METRICS: the users' mean, chance (each user's own candidate count), and the
    paired bootstrap 95% interval of the difference (pipeline/significance.py); `excludes_zero` true
    means the interval lies wholly above or below chance."""
    model = per_user_metrics(ranks, _CHANCE_KS)
    by_k = {k: chance_metrics(k) for k in set(counts)}  # once per candidate count, not per user
    chance = {m: np.array([by_k[k][m] for k in counts]) for m in CHANCE_METRICS}
    tests = paired_tests(chance, {m: np.asarray(model[m]) for m in CHANCE_METRICS}, list(CHANCE_METRICS))
    return {m: {"chance": r.retriever, "mean": r.reranker, "ci_low": r.ci_low, "ci_high": r.ci_high, "excludes_zero": r.excludes_zero}
            for m, r in tests.items()}


# ----------------------------------------------------------------------------------------
# Reports


def to_csv(result: Mapping[str, Any]) -> str:
    """One line per condition and slot: condition, slot, label, n, hits, accuracy, picks, pick_share."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["condition", "slot", "label", "n", "hits", "accuracy", "picks", "pick_share"])
    for c, sec in result["conditions"].items():
        for s in sec["slots"]:
            acc = "" if s["accuracy"] is None else f"{s['accuracy']:.6f}"
            w.writerow([c, s["slot"], s["label"], s["n"], s["hits"], acc, s["picks"], f"{s['pick_share']:.6f}"])
    return buf.getvalue()


def to_markdown(result: Mapping[str, Any], title: str = "Position bias") -> str:
    """Overall metrics per condition, then top-1 accuracy and pick share per slot."""
    conds = result["conditions"]
    lines = [
        f"# {title}",
        "",
        f"{result['n_users']} covered users, {result['n_slots']} candidates each, {result['permutations']} candidate "
        "orders per user (the retriever's first, then seeded shuffles). Accuracy = top-1 accuracy (Recall@1) of the "
        "users whose ground truth sat in that slot (for the averaged condition, its slot in retriever order); "
        "picks = share of all users whose top-1 candidate sat in that slot.",
        "",
        markdown_table(["condition", *SUMMARY_METRICS],
                       [[sec["description"], *(f"{sec['overall'][m]:.4f}" for m in SUMMARY_METRICS)] for sec in conds.values()]),
    ]
    chance = [[sec["description"], m, f"{v['mean']:.4f}", f"{v['chance']:.4f}", f"{v['ci_low']:+.4f}..{v['ci_high']:+.4f}"]
              for sec in conds.values() for m, v in sec.get("vs_chance", {}).items()]
    lines += ["", "Against a uniformly random ranking (paired bootstrap 95% interval of the difference):", "",
              markdown_table(["condition", "metric", "model", "chance", "interval"], chance)]
    r, sh, av = conds["retriever_order"]["slots"], conds["shuffled"]["slots"], conds["averaged"]["slots"]

    def acc(s: Mapping[str, Any]) -> str:
        return "-" if s["accuracy"] is None else f"{s['accuracy']:.3f}"

    slots = [[a["label"], a["n"], acc(a), acc(m), b["n"], acc(b), f"{a['pick_share']:.3f}", f"{b['pick_share']:.3f}",
              f"{m['pick_share']:.3f}"] for a, b, m in zip(r, sh, av)]
    header = ["slot", "n (retriever)", "acc retriever", "acc averaged", "n (shuffled)", "acc shuffled", "picks retriever",
              "picks shuffled", "picks averaged"]
    lines += ["", markdown_table(header, slots)]
    return "\n".join(lines) + "\n"


def write_outputs(result: Mapping[str, Any], out_dir: str | Path, title: str = "Position bias") -> list[Path]:
    """position_bias.{json,csv,md,png} in `out_dir` (each written atomically); returns their paths."""
    from analysis.plots import plot_position_bias  # matplotlib only when writing

    out = Path(out_dir)
    paths = [out / name for name in OUTPUT_FILES]
    write_json(paths[0], result)
    write_text(paths[1], to_csv(result))
    write_text(paths[2], to_markdown(result, title))
    plot_position_bias(result, paths[3], title=title)
    return paths


def load_result(out_dir: str | Path) -> dict[str, Any]:
    """position_bias.json of a directory scripts/position_bias.py wrote."""
    import json

    path = Path(out_dir) / OUTPUT_FILES[0]
    if not path.is_file():
        raise PipelineError(f"{path} not found: run scripts/position_bias.py --run RUN_DIR --out {out_dir} first")
    return json.loads(path.read_text(encoding="utf-8"))
