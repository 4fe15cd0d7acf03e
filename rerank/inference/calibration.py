"""The position prior of the LLM's label scores, estimated on validation prompts and removed.

A reranker reads one score per slot (the label shown in that slot). Part of it is the candidate's
content, part a prior over the slot itself (e.g. a preference for "A" learnt from prompts where the
retriever's top candidate, shown first, was often right). `reranker.calibration` (`RerankerConfig`):

- "none": scores as the model gives them;
- "permuted": `calibration_users` covered VALIDATION users (a seeded sample), each shown in
  `calibration_orders` seeded shuffled candidate orders (the seeded shuffles of
  `ranker.candidate_orders(K, orders + 1, seed, user)`, the identity order dropped: in retriever
  order content and slot are confounded). Each prompt's slot scores are centred (their mean
  subtracted) and averaged slot by slot: the content averages out over the shuffles, the slot's
  prior stays;
- "content_free": the centred slot scores of one prompt whose history is ["N/A"] and whose K
  candidates are all "N/A" (no content, only the slots).

One prior per candidate count K (the labels in use depend on K). It is never estimated on test
rows: the caller passes the validation rows (and, for "content_free", only the candidate counts).
Removing it: with `rank_permutations` = P a candidate's raw score is the mean of its label's scores
over its P orders (`ranker.average_orders`), so subtracting the mean over those orders of the prior
at the slot it sat in (`slot_offsets`) equals calibrating every order's slot scores.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any, Iterable, Mapping, Optional, Sequence

from pipeline import rng_streams
from pipeline.candidates import covered_sample
from pipeline.config import CALIBRATION_METHODS, RerankerConfig
from pipeline.errors import PipelineError
from rerank.inference.ranker import candidate_orders, score_orders

METHODS = CALIBRATION_METHODS  # named once, in the config
CONTENT_FREE = "N/A"  # the history item and every candidate of the content-free prompt
Prior = dict[int, list[float]]  # candidate count K -> the prior of each of its K slots (mean 0)


def centred(scores: Sequence[float]) -> list[float]:
    """`scores` minus their mean."""
    mean = sum(scores) / len(scores)
    return [s - mean for s in scores]


def prior_from_slot_scores(prompts: Iterable[Sequence[float]]) -> Prior:
    """Per candidate count K: the mean over prompts of each slot's centred score."""
    sums: dict[int, list[float]] = {}
    counts: dict[int, int] = defaultdict(int)
    for scores in prompts:
        k = len(scores)
        acc = sums.setdefault(k, [0.0] * k)
        for slot, s in enumerate(centred(scores)):
            acc[slot] += s
        counts[k] += 1
    return {k: [s / counts[k] for s in sums[k]] for k in sorted(sums)}


def sample_users(rows: Sequence[Mapping[str, Any]], n: Optional[int], seed: int) -> list[Mapping[str, Any]]:
    """The covered rows (target among the candidates), or a seeded uniform sample of `n` of them
    in file order (a draw of its own, apart from training's validation users)."""
    return covered_sample(rows, n, seed, rng_streams.CALIBRATION_USERS)




def permuted_rows(rows: Sequence[Mapping[str, Any]], orders: int, seed: int) -> list[dict[str, Any]]:
    """Each row once per seeded shuffled candidate order (the identity order left out), its
    candidates listed in that order: scored with permutations=1, slot i shows candidates[i]."""
    out = []
    for row in rows:
        cands = list(row["candidates"])
        for order in candidate_orders(len(cands), orders + 1, seed, str(row["user"]))[1:]:
            out.append({"user": row["user"], "history": list(row["history"]), "candidates": [cands[j] for j in order]})
    return out


def content_free_rows(ks: Iterable[int]) -> list[dict[str, Any]]:
    """One prompt per candidate count: history ["N/A"], K candidates "N/A"."""
    return [{"user": f"content-free-{k}", "history": [CONTENT_FREE], "candidates": [CONTENT_FREE] * k} for k in sorted(set(ks))]


def estimate_prior(
    method: str,
    model: Any,
    tokenizer: Any,
    style: Any,
    val_rows: Sequence[Mapping[str, Any]],
    titles: Mapping[str, str],
    cfg: RerankerConfig,
    seed: int,
    ks: Iterable[int] = (),
    progress: bool = False,
) -> Prior:
    """The prior per candidate count from VALIDATION rows (`method` "permuted"), or from content-free
    prompts for each K in `ks` ("content_free"); {} for "none". `cfg`: a RerankerConfig
    (calibration_users, calibration_orders, rank_batch_size)."""
    if method == "none":
        return {}
    if method == "permuted":
        users = sample_users(val_rows, cfg.calibration_users, seed)
        if not users:
            raise PipelineError(
                "reranker.calibration=permuted needs covered validation users to estimate the position prior, "
                "and there are none: use calibration content_free or none"
            )
        prompts, lookup = permuted_rows(users, cfg.calibration_orders, seed), titles
    elif method == "content_free":
        prompts, lookup = content_free_rows(ks), {CONTENT_FREE: CONTENT_FREE}
    else:
        raise PipelineError(f"reranker.calibration {method!r} is not one of {', '.join(METHODS)}")
    per_order = score_orders(
        model, tokenizer, style, prompts, lookup, batch_size=cfg.rank_batch_size, permutations=1, seed=seed, progress=progress
    )
    return prior_from_slot_scores(pairs[0][1] for pairs in per_order)  # permutations=1: the order as listed


def slot_offsets(k: int, prior_k: Sequence[float], permutations: int, seed: int, user: str) -> list[float]:
    """Per candidate (candidates order): the mean over its `permutations` orders
    (`ranker.candidate_orders`, as the ranker used them) of the prior at the slot it was shown in."""
    out = [0.0] * k
    for order in candidate_orders(k, permutations, seed, user):
        for slot, j in enumerate(order):  # the candidate in `slot` is candidates[j]
            out[j] += prior_k[slot] / permutations
    return out


def calibrate(rankings: Sequence[Mapping[str, Any]], prior: Prior, permutations: int, seed: int) -> list[list[float]]:
    """Each rankings row's `scores` (raw, averaged over `permutations` orders seeded by `seed`) minus
    its candidates' slot offsets."""
    out = []
    for rk in rankings:
        k = len(rk["candidates"])
        if k not in prior:
            raise PipelineError(
                f"user {rk['user']!r} has {k} candidates, and no validation prompt with {k} candidates was scored to "
                f"estimate the position prior (estimated for K = {sorted(prior)}): set reranker.calibration_users=null, "
                "or use calibration content_free"
            )
        offsets = slot_offsets(k, prior[k], permutations, seed, str(rk["user"]))
        out.append([s - o for s, o in zip(rk["scores"], offsets)])
    return out


def prior_json(prior: Prior) -> dict[str, list[float]]:
    """The prior as metrics.json holds it (JSON keys are strings)."""
    return {str(k): list(v) for k, v in sorted(prior.items())}
