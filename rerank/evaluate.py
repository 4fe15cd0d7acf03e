"""Rerank one split's candidates and measure it: the rankings rows and the split's metrics.json section.

Only covered users (target among the candidates) are sent to the model (SPEC: the others are not
sent to the LLM); every number comes from pipeline/metrics.py:
- `subset`: the reranker on the covered users (paper Table 3, right);
- `overall`: coverage-weighted, subset * n_covered / n_users (paper Table 1): for k <= the
  candidate count an uncovered user scores 0 whatever the order;
- `retriever_subset`: the retriever's order on the covered users (paper Table 3, left);
- `retriever`: the retriever's order over all users, ranks within its candidates. For k <= the
  candidate count this equals the full-catalogue metric; the caller may put the retriever run's
  own metrics.json section (full catalogue, also k = 50) in its place.
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional, Sequence

import numpy as np
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.candidates import ROW_FIELDS
from pipeline.data.dataset import SplitDataset
from pipeline.errors import PipelineError
from pipeline.metrics import candidate_rank, check_finite, coverage_weighted, metrics_from_ranks, per_user_metrics
from pipeline.significance import CONFIDENCE, paired_tests
from rerank.distributed import from_main, gather, is_main, rank_and_world
from rerank.progress import PartialRankings
from rerank.prompts import PromptStyle, label_tokens
from rerank.readout import has_readout
from rerank.ranker import average_orders, encode_rows, length_ordered_batches, rank_rows, score_prompts

# Cut-offs reported for the reranker: at most the 20 candidates it orders (k = 50 would equal 20).
RERANK_KS = (1, 5, 10, 20)
TABLE_KS = (5, 10)  # the paper's tables report @5 and @10
TABLE_METRICS = ("NDCG", "Recall", "MRR")
BOOTSTRAP_METRIC = "NDCG@10"  # metrics.json `bootstrap`: subset NDCG@10 against the retriever's order
BOOTSTRAP_RESAMPLES = 2000
# Where a rankings row keeps the LLM's raw scores (label log-probs, averaged over the orders), first
# found wins: `llm_raw_scores` (calibrated runs), `llm_scores` (uncalibrated runs), `scores` (older runs).
RAW_SCORE_KEYS = ("llm_raw_scores", "llm_scores", "scores")


def titles_by_item(dataset: SplitDataset) -> dict[str, str]:
    """Original item id -> title, the lookup `rank_split` takes."""
    return {item: title for item, title in zip(dataset.item_ids[1:], dataset.titles[1:])}


def raw_scores(row: Mapping[str, Any]) -> Any:
    """A rankings row's raw LLM scores (`RAW_SCORE_KEYS`), None when it has none."""
    return next((row[key] for key in RAW_SCORE_KEYS if key in row), None)


def is_covered(row: Mapping[str, Any]) -> bool:
    """True when the user's target is among its candidates (only these users go to the LLM)."""
    return row["target"] in row["candidates"]


def covered_sample(rows: Sequence[Mapping[str, Any]], n: Optional[int], seed: int, stream: int) -> list[Mapping[str, Any]]:
    """The covered rows, or a uniform sample of `n` of them drawn from the RNG stream (seed, stream),
    in file order: the validation users of training, the calibration users (each its own stream)."""
    covered = [row for row in rows if is_covered(row)]
    if n is not None and len(covered) > n:
        keep = np.random.default_rng([seed, stream]).choice(len(covered), size=n, replace=False)
        covered = [covered[i] for i in sorted(keep.tolist())]
    return covered


def rank_split(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    rows: Sequence[Mapping[str, Any]],
    titles: Mapping[str, str],
    cfg: Any,
    seed: int = 0,
    progress: bool = True,
    partial: Optional[PartialRankings] = None,
    split: str = "",
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(rankings rows, metrics section) for one split's candidates rows.

    `titles`: original item id -> title (`titles_by_item`); `cfg`: a `RerankerConfig`
    (rank_batch_size, rank_permutations); `seed`: the run's seed (candidate orders when
    rank_permutations > 1). Rankings rows exist for covered users only (the others have no reranker
    scores): the candidates-file fields with `scores` = reranker scores in `candidates` order, plus
    "label_scheme".

    `partial`: the split's progress file (rerank/progress.py): batches it already holds are kept,
    each newly scored batch is appended to it at once, so a killed ranking resumes where it stopped.
    Under `accelerate launch` the batches are shared out among the processes, one per process at a
    time, and every process returns all rows. Either way the batches are exactly those of one
    uninterrupted pass (`rank_rows`), so the scores are bit-identical to it. The caller writes the
    final file (`partial.finish`, main process). A non-finite score stops the split with a one-line
    error naming `split` and the user (`check_scores`), before any file or metric holds it."""
    covered = [row for row in rows if is_covered(row)]
    if partial is None and rank_and_world()[1] == 1:
        scores = rank_rows(
            model, tokenizer, style, covered, titles,
            batch_size=cfg.rank_batch_size, permutations=cfg.rank_permutations, seed=seed, progress=progress,
        )
    else:
        scores = _rank_in_batches(model, tokenizer, style, covered, titles, cfg, seed, progress, partial, split)
    check_scores(covered, scores, f"LLM scores ({split or 'ranking'})")
    check_not_collapsed(scores, f"LLM scores ({split or 'ranking'})")
    rankings = [
        {**{key: row[key] for key in ROW_FIELDS}, "scores": s, "label_scheme": style.scheme.name}
        for row, s in zip(covered, scores)
    ]
    return rankings, split_metrics(rows, rankings)


def _rank_in_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    covered: Sequence[Mapping[str, Any]],
    titles: Mapping[str, str],
    cfg: Any,
    seed: int,
    progress: bool,
    partial: Optional[PartialRankings],
    split: str = "",
) -> list[list[float]]:
    """`rank_rows`, batch by batch: resumable from `partial`, shared among processes. Each scored
    batch is checked finite before the progress file keeps it."""
    main = is_main()
    readout = has_readout(model)  # the readout head reads each candidate line's end
    jobs = encode_rows(tokenizer, style, covered, titles, cfg.rank_permutations, seed, progress and main, with_ends=readout)
    tokens = label_tokens(tokenizer, style)
    # The batches of one uninterrupted pass (score_prompts' batching per candidate count K), in its
    # order, so the scores are the same bits as rank_rows'.
    batches: list[tuple[int, list[int]]] = [  # (K, positions in jobs[K])
        (k, idx) for k, group in jobs.items()
        for idx in length_ordered_batches([len(ids) for _, _, ids, _ in group], cfg.rank_batch_size)
    ]
    digest = hashlib.sha256(f"{cfg.rank_batch_size}|{cfg.rank_permutations}|{seed}".encode())
    for k, idx in batches:  # the plan's identity: a partial file of other batches is refused
        for i in idx:
            r, slots, ids, _ = jobs[k][i]
            digest.update(f"|{k}|{covered[r]['user']}|{slots}|".encode())
            digest.update(ids.tobytes())
    plan = digest.hexdigest()

    done = from_main(lambda: partial.load(plan, len(batches))) if partial is not None else {}
    for b, scores in done.items():
        k, idx = batches[b]
        if len(scores) != len(idx) or any(len(s) != k for s in scores):
            raise PipelineError(f"{partial.path}: batch {b} has scores of another shape: delete the file to rank this split afresh")
    rank, world = rank_and_world()
    pending = [b for b in range(len(batches)) if b not in done]
    if progress and main and partial is not None and done:
        print(f"ranking: kept {len(done)} of {len(batches)} batches from {partial.path.name}, {len(pending)} to score")
    for start in tqdm(range(0, len(pending), world), desc="ranking", unit="batch", disable=not progress or not main):
        mine = pending[start + rank] if start + rank < len(pending) else None
        scored = None
        if mine is not None:
            k, idx = batches[mine]
            ids = [jobs[k][i][2] for i in idx]
            ends = [jobs[k][i][3] for i in idx] if readout else None
            scored = (mine, score_prompts(model, ids, tokens.for_k(k), len(ids), tokenizer.pad_token_id, progress=False, ends=ends))
            check_scores([covered[jobs[k][i][0]] for i in idx], scored[1], f"LLM scores ({split or 'ranking'})")
        results = [x for x in gather(scored) if x is not None]
        if partial is not None and main:
            partial.append(results)
        done.update(results)

    # Each row's orders in score_orders' sequence, then rank_rows' averaging.
    by_job = {(k, i): s for b, (k, idx) in enumerate(batches) for i, s in zip(idx, done[b])}
    per_order: list[list[tuple[list[int], list[float]]]] = [[] for _ in covered]
    for k, group in jobs.items():
        for i, (r, slots, _, _) in enumerate(group):
            per_order[r].append((slots, by_job[(k, i)]))
    return average_orders(covered, per_order, cfg.rank_permutations)


def check_scores(rows: Sequence[Mapping[str, Any]], scores: Sequence[Sequence[float]], stage: str) -> None:
    """Every user's scores finite, else a one-line error naming `stage` (what produced them, and
    the split) and the user (`pipeline.metrics.check_finite`)."""
    for row, s in zip(rows, scores):
        check_finite(s, f"{stage}, user {row['user']!r}")


def check_not_collapsed(scores: Sequence[Sequence[float]], stage: str) -> None:
    """Refuse scores that tie every candidate of every user: ties keep the retriever's order, so such
    a model (collapsed by e.g. too high a learning rate: its loss flat, its gradients 0) would report
    the retriever's own metrics as the LLM's, with exit 0."""
    rows = [s for s in scores if len(s) > 1]
    if rows and all(max(s) == min(s) for s in rows):
        raise PipelineError(
            f"{stage}: every candidate of each of the {len(rows)} users has the same score ({rows[0][0]:g}): a collapsed "
            "model ranks nothing and its metrics would be the retriever's order; retrain it (e.g. lower reranker.learning_rate)"
        )


def split_metrics(
    rows: Sequence[Mapping[str, Any]], rankings: Sequence[Mapping[str, Any]], ks: Sequence[int] = RERANK_KS
) -> dict[str, Any]:
    """The metrics.json section of one split from ALL users' candidates rows (retriever order) and
    the covered users' rankings rows (reranker scores), matched by user."""
    n_users = len(rows)
    if n_users == 0:
        raise PipelineError("no users in the candidates file: regenerate it with the retriever")
    by_user: dict[str, Mapping[str, Any]] = {}
    for rk in rankings:
        if rk["user"] in by_user:
            raise PipelineError(f"user {rk['user']!r} is ranked twice: rank each split's candidates file once")
        by_user[rk["user"]] = rk
    covered = [row for row in rows if is_covered(row)]
    missing = [row["user"] for row in covered if row["user"] not in by_user]
    if missing or len(by_user) != len(covered):
        raise PipelineError(
            f"the rankings do not match the covered users ({len(by_user)} ranked, {len(covered)} covered"
            f"{', e.g. user ' + repr(missing[0]) + ' unranked' if missing else ''}): rank the same candidates file"
        )
    reranked = [_ranked(by_user[row["user"]], row) for row in covered]
    subset = metrics_from_ranks(reranked, ks)
    return {
        "retriever": metrics_from_ranks([_retriever_rank(row) for row in rows], ks),
        "retriever_subset": metrics_from_ranks([_retriever_rank(row) for row in covered], ks),
        "subset": subset,
        "overall": coverage_weighted(subset, len(covered), n_users),
        "coverage": len(covered) / n_users,
        "n_users": n_users,
        "n_covered": len(covered),
    }


def _retriever_rank(row: Mapping[str, Any]) -> Optional[int]:
    """The target's 1-based position in retriever order (the candidates are stored in it)."""
    return row["candidates"].index(row["target"]) + 1 if is_covered(row) else None


def _ranked(rk: Mapping[str, Any], row: Mapping[str, Any]) -> Optional[int]:
    if list(rk["candidates"]) != list(row["candidates"]) or rk["target"] != row["target"]:
        raise PipelineError(f"user {row['user']!r}: rankings and candidates disagree: rank the same candidates file")
    return candidate_rank(rk["scores"], rk["candidates"], rk["target"])


def top1_slots(rankings: Sequence[Mapping[str, Any]], key: str = "scores") -> dict[str, Any]:
    """Where the top-1 of `key` sits in retriever order, over the rankings' (covered) users:
    `counts[i]` users whose top-ranked candidate is candidates[i] (ties to the earlier candidate,
    as `candidate_rank`), `max_share` the largest share and `max_slot` its slot, `target_counts`
    the same histogram of the targets (what a perfect reranker's top-1 would give)."""
    k = max((len(rk["candidates"]) for rk in rankings), default=0)
    counts, targets = [0] * k, [0] * k
    for rk in rankings:
        s = rk[key]
        counts[max(range(len(s)), key=lambda j: (s[j], -j))] += 1
        targets[list(rk["candidates"]).index(rk["target"])] += 1
    n = len(rankings)
    top = max(range(k), key=lambda j: (counts[j], -j)) if k else None
    return {"n": n, "counts": counts, "max_share": counts[top] / n if n else None, "max_slot": top, "target_counts": targets}


def top1_hit_non_top1(rankings: Sequence[Mapping[str, Any]], key: str = "scores") -> dict[str, Any]:
    """Among the users whose target is NOT the retriever's top-1: the share whose top-1 by `key` is
    the target (n such users, hits), against the chance rate 1/(K-1) of a pick among the others."""
    users = [rk for rk in rankings if rk["candidates"][0] != rk["target"]]
    hits = sum(1 for rk in users if candidate_rank(rk[key], rk["candidates"], rk["target"]) == 1)
    n = len(users)
    chance = sum(1.0 / (len(rk["candidates"]) - 1) for rk in users) / n if n else None
    return {"share": hits / n if n else None, "n": n, "hits": hits, "chance": chance}


def bootstrap_vs_retriever(
    rankings: Sequence[Mapping[str, Any]],
    keys: Mapping[str, str],
    seed: int,
    metric: str = BOOTSTRAP_METRIC,
    n_resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict[str, Any]:
    """Paired bootstrap (pipeline/significance.py, per-user resampling, seeded) of the subset
    `metric` of each `keys` entry (name -> rankings field with its scores) minus the retriever's
    order, over the rankings' (covered) users: {name: {mean, ci_low, ci_high, p_bootstrap}}. Every
    comparison draws the same resampled users."""
    out: dict[str, Any] = {"metric": metric, "n": len(rankings), "resamples": n_resamples, "confidence": CONFIDENCE, "seed": seed}
    if not rankings:
        return out
    k = int(metric.split("@")[1])
    retriever = per_user_metrics([list(rk["candidates"]).index(rk["target"]) + 1 for rk in rankings], [k])
    for name, key in keys.items():
        system = per_user_metrics([candidate_rank(rk[key], rk["candidates"], rk["target"]) for rk in rankings], [k])
        res = paired_tests(
            {metric: np.asarray(retriever[metric])}, {metric: np.asarray(system[metric])}, [metric], n_resamples, seed
        )[metric]
        out[name] = {"mean": res.mean_diff, "ci_low": res.ci_low, "ci_high": res.ci_high, "p_bootstrap": res.p_bootstrap}
    return out


def llm_evidence(rows: Sequence[Mapping[str, Any]], rankings: Sequence[Mapping[str, Any]], seed: int) -> dict[str, Any]:
    """The metrics.json entries about the LLM alone, from rankings rows with `scores` (final),
    `llm_scores` and, when calibrated, `llm_raw_scores`: `llm_subset` / `llm_overall` (and
    `llm_raw_subset`), the top-1 slot histogram(s), the top-1 hit rate off the retriever's top-1,
    and the paired bootstrap of final and LLM alone against the retriever's order."""
    calibrated = bool(rankings) and "llm_raw_scores" in rankings[0]
    llm = split_metrics(rows, [dict(rk, scores=rk["llm_scores"]) for rk in rankings])
    out: dict[str, Any] = {"llm_subset": llm["subset"], "llm_overall": llm["overall"]}
    if calibrated:
        out["llm_raw_subset"] = split_metrics(rows, [dict(rk, scores=rk["llm_raw_scores"]) for rk in rankings])["subset"]
    out["llm_top1_slots"] = top1_slots(rankings, "llm_scores")
    if calibrated:
        out["llm_raw_top1_slots"] = top1_slots(rankings, "llm_raw_scores")
    out["llm_top1_hit_non_top1"] = top1_hit_non_top1(rankings, "llm_scores")
    keys = {"final_minus_retriever": "scores", "llm_minus_retriever": "llm_scores"}
    if calibrated:
        keys["llm_raw_minus_retriever"] = "llm_raw_scores"
    out["bootstrap"] = bootstrap_vs_retriever(rankings, keys, seed)
    return out


def markdown_table(section: Mapping[str, Any], ks: Sequence[int] = TABLE_KS) -> str:
    """Retriever vs reranker on the covered subset and overall (NDCG/Recall/MRR @5 and @10), as
    a markdown table for one split's metrics section. Sections with the LLM-alone entries
    (`llm_subset`, ...: rerank/run.py) show them side by side, with the fusion weight, the paired
    bootstrap intervals and the LLM's top-1 slot figures below the table."""
    cols = [f"{m}@{k}" for k in ks for m in TABLE_METRICS]
    lines = [
        f"coverage {section['coverage']:.4f} ({section['n_covered']}/{section['n_users']} users)",
        "",
        "| | " + " | ".join(cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    calibrated = "llm_raw_subset" in section
    llm_name = "LLM calibrated" if calibrated else "LLM alone"
    table = [("Retriever (subset)", "retriever_subset")]
    if calibrated:
        table.append(("LLM raw (subset)", "llm_raw_subset"))
    if "llm_subset" in section:
        table.append((f"{llm_name} (subset)", "llm_subset"))
    table += [("Reranker (subset)", "subset"), ("Retriever (overall)", "retriever")]
    if "llm_overall" in section:
        table.append((f"{llm_name} (overall)", "llm_overall"))
    table.append(("Reranker (overall)", "overall"))
    for name, key in table:
        lines.append(f"| {name} | " + " | ".join(f"{section[key][c]:.4f}" for c in cols) + " |")
    notes = _evidence_notes(section, llm_name)
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def _evidence_notes(section: Mapping[str, Any], llm_name: str) -> list[str]:
    notes = []
    fusion = section.get("fusion")
    if fusion is not None:
        if fusion.get("grid"):
            grid = ", ".join(f"w={w} {v:.4f}" for w, v in fusion["grid"].items())
            notes.append(f"- Reranker = z(LLM) + w * z(retriever), w = {fusion['w']:g} chosen on val NDCG@10 ({grid})")
        else:
            notes.append("- Reranker = LLM alone (fusion off, w = 0)")
    cal = section.get("calibration")
    if cal is not None and cal.get("method", "none") != "none":
        for k, prior in cal["prior"].items():
            notes.append(f"- Calibration {cal['method']}: position prior (K={k}, slot 1 first) " + " ".join(f"{p:+.3f}" for p in prior))
    boot = section.get("bootstrap")
    if boot is not None and boot.get("n"):
        notes.append(
            f"- Paired bootstrap, subset {boot['metric']} minus the retriever's order ({boot['n']} users, "
            f"{boot['resamples']} resamples, {boot['confidence']:.0%} interval):"
        )
        for key, name in (("final_minus_retriever", "Reranker"), ("llm_minus_retriever", llm_name), ("llm_raw_minus_retriever", "LLM raw")):
            if key in boot:
                b = boot[key]
                notes.append(f"  - {name}: {b['mean']:+.4f} [{b['ci_low']:+.4f}, {b['ci_high']:+.4f}]")
    for key, name in (("llm_raw_top1_slots", "LLM raw"), ("llm_top1_slots", llm_name)):
        t = section.get(key)
        if t is not None and t.get("n"):
            notes.append(
                f"- {name} top-1 by retriever slot (1..{len(t['counts'])}, {t['n']} users): " + " ".join(map(str, t["counts"]))
                + f"; max share {t['max_share']:.3f} (slot {t['max_slot'] + 1})"
            )
    if "llm_top1_slots" in section and section["llm_top1_slots"].get("n"):
        notes.append("- Targets by retriever slot: " + " ".join(map(str, section["llm_top1_slots"]["target_counts"])))
    hit = section.get("llm_top1_hit_non_top1")
    if hit is not None and hit.get("n"):
        notes.append(
            f"- {llm_name} top-1 is the target when the retriever's top-1 is not: {hit['share']:.3f} "
            f"({hit['hits']}/{hit['n']} users; chance 1/(K-1) = {hit['chance']:.3f})"
        )
    return notes
