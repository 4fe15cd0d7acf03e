"""Rerank one split's candidates: the rankings rows, resumable and shared out among processes.

Only covered users (target among the candidates) are sent to the model (docs/design.md, "Stages and
data flow": the others are not sent to the LLM). Each batch of scores is checked (finite, not all
tied) before the progress file keeps it. The split's metrics section is `split_metrics`
(`rerank.evaluation.metrics`).
"""
from __future__ import annotations

import hashlib
from typing import Any, Mapping, Optional, Sequence

from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.candidates import ROW_FIELDS, is_covered
from pipeline.config import RerankerConfig
from pipeline.distributed import from_main, gather, is_main, rank_and_world
from pipeline.errors import PipelineError
from pipeline.metrics import check_finite
from rerank.inference.progress import PartialRankings
from rerank.inference.ranker import average_orders, encode_rows, length_ordered_batches, rank_rows, score_prompts
from rerank.model.readout import has_readout
from rerank.prompting.prompts import needs_lines
from rerank.prompting.prompts import label_tokens
from rerank.prompting.style import PromptStyle


def rank_split(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    rows: Sequence[Mapping[str, Any]],
    titles: Mapping[str, str],
    cfg: RerankerConfig,
    seed: int = 0,
    progress: bool = True,
    partial: Optional[PartialRankings] = None,
    split: str = "",
) -> list[dict[str, Any]]:
    """The rankings rows of one split's candidates rows (their metrics: `split_metrics`).

    `titles`: original item id -> title (`titles_by_item`); `cfg`: a `RerankerConfig`
    (rank_batch_size, rank_permutations); `seed`: the run's seed (candidate orders when
    rank_permutations > 1). Rankings rows exist for covered users only (the others have no reranker
    scores): the candidates-file fields with `scores` = reranker scores in `candidates` order, plus
    "label_scheme".

    `partial`: the split's progress file (`PartialRankings`): batches it already holds are kept,
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
    return rankings


def _rank_in_batches(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    covered: Sequence[Mapping[str, Any]],
    titles: Mapping[str, str],
    cfg: RerankerConfig,
    seed: int,
    progress: bool,
    partial: Optional[PartialRankings],
    split: str = "",
) -> list[list[float]]:
    """`rank_rows`, batch by batch: resumable from `partial`, shared among processes. Each scored
    batch is checked finite before the progress file keeps it."""
    main = is_main()
    lines = needs_lines(style, has_readout(model))  # the readout reads each line's end; isolated lines are shown apart
    jobs = encode_rows(tokenizer, style, covered, titles, cfg.rank_permutations, seed, progress and main, with_ends=lines)
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
            ends = [jobs[k][i][3] for i in idx] if lines else None
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


