"""Training samples for the LLM reranker, as LlamaRec builds them.

Every prefix of every user's TRAIN sequence (`SplitDataset.train_sequence`: all but the last two
items, so validation and test targets never appear) is one sample: target = item t, history = the
items before it (the prompt builder shows the last `max_history`), candidates = the target and K-1
negatives, shuffled. The paper uses every prefix whose history has at least one item.

Negatives never repeat and never come from the history so far or the target (LlamaRec's rule:
later items of the same user's train sequence may be negatives, as in the paper):
- "random": uniform over the catalogue (the paper).
- "retriever": hard negatives, the sample's retriever candidates in retriever order, then topped up
  at random.
- "mix": the first round(ratio * (K-1)) usable retriever candidates (Python's round: halves to
  even), the rest uniform random (they may, by chance, also be in the retriever's list). Ratio 0
  gives exactly the "random" samples, ratio 1 exactly the "retriever" ones.
A sample's retriever candidates are, when the retriever run wrote candidates_train_prefixes.jsonl
(`prefix_rows`), the top-K after that very prefix (its input items[:t] masked); a prefix the file
lacks (retriever.prefix_candidates kept fewer prefixes than are sampled) falls back to the user's
candidates_train.jsonl row, and their number is logged. Without the prefix file every prefix of a
user uses the candidates_train.jsonl row (the top-K for the user's LAST train item, its input
history masked). Each file must be this dataset's train split: a candidates_train row's target is
the user's last train item, a prefix file's target at position t is the user's train item t.

`covered_only` keeps just the prefixes whose target is in that prefix's own retriever list, so a
training prompt holds what a val/test prompt does (covered users only: the target among the
retriever's top-K). Without it, a prefix the retriever missed shows the target among the
retriever's favourites, the one candidate the retriever did not propose: a shortcut a model learns
and val/test never reward.

Deterministic: a sample's candidates depend only on (seed, user, t), never on which other samples
are kept, so capping with `max_samples` / `max_prefixes_per_user` does not change the samples kept.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence

import numpy as np

from pipeline import rng_streams
from pipeline.config import RerankerConfig
from pipeline.data.dataset import SplitDataset
from pipeline.errors import PipelineError

log = logging.getLogger(__name__)

Negatives = Literal["random", "retriever", "mix"]
USES_RETRIEVER = ("retriever", "mix")  # the negatives that read the retriever's candidates files


@dataclass(frozen=True)
class TrainSample:
    """One training prompt, in dense item ids (titles: `SplitDataset.titles`)."""

    user: int  # dense user index
    position: int  # index t of the target in the user's train sequence
    history: tuple[int, ...]  # items before the target, oldest first (the last `history_len` kept)
    candidates: tuple[int, ...]  # shuffled; candidate i gets label i
    target_index: int  # where the target is in `candidates`

    @property
    def target(self) -> int:
        return self.candidates[self.target_index]


def copy_sample(s: TrainSample) -> TrainSample:
    """`s` with its target replaced by its last history item, in the target's slot: the copy prompt of
    the binding warm-up and mix (reranker.binding_warmup_steps, binding_mix_epochs). The negatives never
    hold an item of the history so far (`build_samples`), so the answer is the only candidate whose
    title the history shows last. `s` needs a history."""
    i = s.target_index
    return dataclasses.replace(s, candidates=(*s.candidates[:i], s.history[-1], *s.candidates[i + 1 :]))


def build_samples(
    ds: SplitDataset,
    *,
    n_candidates: int = 20,  # paper: target + 19 negatives
    negatives: Negatives = "random",  # paper: random
    seed: int = 0,
    history_len: int = 20,  # history items stored per sample; the prompt shows at most max_history (paper: 20)
    min_history: int = 1,  # paper: prefixes from the 2nd item on
    max_prefixes_per_user: Optional[int] = None,  # None = every prefix (paper)
    max_samples: Optional[int] = None,  # None = every prefix (paper)
    retriever_rows: Optional[Sequence[dict[str, Any]]] = None,  # candidates_train.jsonl rows ("retriever", "mix")
    prefix_rows: Optional[Sequence[dict[str, Any]]] = None,  # candidates_train_prefixes.jsonl rows: preferred when given
    retriever_ratio: float = 0.5,  # "mix" only: share of the K-1 negatives from the retriever
    covered_only: bool = False,  # only prefixes whose target is in their own prefix_rows list
) -> list[TrainSample]:
    """The training samples of `ds`, ordered by (user, position)."""
    if n_candidates < 2:
        raise PipelineError(f"training prompts need the target and at least one negative (got {n_candidates} candidates)")
    if seed < 0:
        raise PipelineError(f"seed must be >= 0 (got {seed})")
    if negatives not in ("random", *USES_RETRIEVER):
        raise PipelineError(f"unknown negatives {negatives!r}: use random, retriever or mix")
    hard: dict[int, list[int]] = {}
    per_prefix: Optional[dict[tuple[int, int], list[int]]] = None
    if negatives in USES_RETRIEVER:
        if retriever_rows is None and prefix_rows is None:
            raise PipelineError(
                f"train_negatives {negatives!r} needs candidates_train.jsonl: run the retriever first, or use random"
            )
        if retriever_rows is not None:
            hard = _hard_negatives(ds, retriever_rows)
        if prefix_rows is not None:
            per_prefix = prefix_lists(ds, prefix_rows)
    elif retriever_rows is not None or prefix_rows is not None:
        raise PipelineError("retriever rows were given but negatives is 'random': set train_negatives=retriever or drop them")
    if negatives == "mix":
        if not 0.0 <= retriever_ratio <= 1.0:
            raise PipelineError(f"reranker.retriever_negative_ratio must be in [0, 1] (got {retriever_ratio})")
        n_hard = round(retriever_ratio * (n_candidates - 1))  # most retriever negatives per sample
    else:
        n_hard = n_candidates - 1 if negatives == "retriever" else 0

    prefixes = _prefixes(ds, min_history, max_prefixes_per_user)
    if covered_only:  # before the cap, so max_samples counts kept prompts
        prefixes = _covered(ds, prefixes, per_prefix)
    if max_samples is not None and len(prefixes) > max_samples:
        keep = np.random.default_rng([seed, rng_streams.SAMPLE_CAP]).choice(len(prefixes), size=max_samples, replace=False)
        prefixes = [prefixes[i] for i in sorted(keep.tolist())]

    samples = []
    fallback = 0  # prefixes the prefix file lacks
    for u, t in prefixes:
        seq = ds.train_sequence(u)
        seen = set(seq[: t + 1])  # history so far + the target
        rng = np.random.default_rng([seed, u, t])
        ranked = hard.get(u, ())  # the user's candidates_train row
        if per_prefix is not None:
            own = per_prefix.get((u, t))
            if own is not None:
                ranked = own
            elif n_hard:
                fallback += 1
        negs = [i for i in ranked if i not in seen][:n_hard]
        negs += _random_items(rng, ds.n_items, seen | set(negs), n_candidates - 1 - len(negs), u)
        pool = [seq[t], *negs]  # the target first, so its shuffled index is order.index(0)
        order = rng.permutation(n_candidates).tolist()
        cands = [pool[i] for i in order]
        samples.append(
            TrainSample(
                user=u,
                position=t,
                history=tuple(seq[max(0, t - history_len) : t]) if history_len else (),
                candidates=tuple(cands),
                target_index=order.index(0),
            )
        )
    if fallback:
        log.warning(
            "%d of %d training prefixes have no row in candidates_train_prefixes.jsonl (retriever.prefix_candidates "
            "kept fewer prefixes): their retriever negatives come from the user's candidates_train row%s",
            fallback, len(prefixes), "" if retriever_rows is not None else " (none given: all random)",
        )
    return samples


def target_listed(per_prefix: Mapping[tuple[int, int], Sequence[int]], user: int, t: int, target: int) -> bool:
    """The coverage rule of a training prefix (`prefix_lists` keys and dense ids): its target is among
    the retriever's candidates for that very prefix, as every val/test prompt's is. A prefix without
    a list is not covered."""
    return target in per_prefix.get((user, t), ())


def _covered(
    ds: SplitDataset, prefixes: Sequence[tuple[int, int]], per_prefix: Optional[dict[tuple[int, int], list[int]]]
) -> list[tuple[int, int]]:
    """The prefixes whose target the retriever put in that prefix's own candidates (what makes a
    val/test user covered). A prefix the prefix file lacks cannot be judged and is dropped."""
    if per_prefix is None:
        raise PipelineError(
            "reranker.train_covered_only needs candidates_train_prefixes.jsonl: run the retriever with "
            "retriever.prefix_candidates != 0, or set train_covered_only=false"
        )
    kept = [(u, t) for u, t in prefixes if target_listed(per_prefix, u, t, ds.train_sequence(u)[t])]
    if not kept:
        raise PipelineError("no training prefix has its target among the retriever's candidates: set train_covered_only=false")
    log.info("train_covered_only: %d of %d prefixes have their target among the retriever's candidates", len(kept), len(prefixes))
    return kept


def samples_from_config(
    ds: SplitDataset,
    cfg: RerankerConfig,
    seed: int,
    retriever_rows: Optional[Sequence[dict[str, Any]]] = None,
    prefix_rows: Optional[Sequence[dict[str, Any]]] = None,
) -> list[TrainSample]:
    """The samples a `pipeline.config.RerankerConfig` asks for; `retriever_rows` (candidates_train.jsonl)
    and `prefix_rows` (candidates_train_prefixes.jsonl, when the retriever run has it) are used only
    with train_negatives=retriever or mix."""
    uses = cfg.train_negatives in USES_RETRIEVER
    mix = {"retriever_ratio": cfg.retriever_negative_ratio} if cfg.train_negatives == "mix" else {}
    return build_samples(
        ds,
        n_candidates=cfg.train_candidates,
        negatives=cfg.train_negatives,
        seed=seed,
        history_len=cfg.max_history,
        min_history=cfg.train_min_history,
        max_prefixes_per_user=cfg.train_max_prefixes_per_user,
        max_samples=cfg.max_train_samples,
        retriever_rows=retriever_rows if uses else None,
        prefix_rows=prefix_rows if uses else None,
        covered_only=cfg.train_covered_only,
        **mix,
    )


def _prefixes(ds: SplitDataset, min_history: int, max_per_user: Optional[int]) -> list[tuple[int, int]]:
    """(user, t) of every kept prefix: t >= min_history, the last `max_per_user` per user."""
    if min_history < 0:
        raise PipelineError(f"min_history must be >= 0 (got {min_history})")
    out = []
    for u in range(ds.n_users):
        ts = list(range(min_history, len(ds.train_sequence(u))))
        if max_per_user is not None:
            ts = ts[-max_per_user:] if max_per_user > 0 else []
        out.extend((u, t) for t in ts)
    if not out:
        raise PipelineError(
            f"no training prefix has {min_history} earlier train items: lower reranker.train_min_history or use more data"
        )
    return out


def _random_items(rng: np.random.Generator, n_items: int, excluded: set[int], n: int, user: int) -> list[int]:
    """`n` distinct items from 1..n_items outside `excluded`, uniformly."""
    if n <= 0:
        return []
    free = n_items - sum(1 for i in excluded if 1 <= i <= n_items)
    if free < n:
        raise PipelineError(
            f"user index {user} has only {free} items left for {n} negatives: lower reranker.train_candidates"
        )
    if len(excluded) * 2 > n_items:  # dense exclusion: draw from the explicit free list
        pool = np.array([i for i in range(1, n_items + 1) if i not in excluded])
        return rng.choice(pool, size=n, replace=False).tolist()
    out: list[int] = []
    taken = set(excluded)
    while len(out) < n:  # rejection sampling; >= half the catalogue is free, so this ends fast
        for i in rng.integers(1, n_items + 1, size=2 * n).tolist():
            if i not in taken:
                taken.add(i)
                out.append(i)
                if len(out) == n:
                    break
    return out


def _hard_negatives(ds: SplitDataset, rows: Sequence[dict[str, Any]]) -> dict[int, list[int]]:
    """Dense user index -> the user's retriever candidates (dense ids, retriever order)."""
    users = {uid: u for u, uid in enumerate(ds.user_ids)}
    items = ds.item_index()
    out: dict[int, list[int]] = {}
    for row in rows:
        u = users.get(row["user"])
        if u is None:
            raise PipelineError(f"candidates_train row for unknown user {row['user']!r}: regenerate it with the same data config")
        seq = ds.train_sequence(u)
        if not seq or items.get(row["target"]) != seq[-1]:
            raise PipelineError(
                f"candidates_train row of user {row['user']!r} has target {row['target']!r}, not the user's last train "
                "item: it is not a train-split candidates file of this dataset; pass candidates_train.jsonl of this run"
            )
        unknown = [i for i in row["candidates"] if i not in items]
        if unknown:
            raise PipelineError(f"candidates_train row of user {row['user']!r} has unknown item {unknown[0]!r}: regenerate it")
        out[u] = [items[i] for i in row["candidates"]]
    missing = ds.n_users - len(out)
    if missing:
        log.warning("%d users have no candidates_train row: their negatives are all random", missing)
    return out


def prefix_lists(ds: SplitDataset, rows: Sequence[dict[str, Any]]) -> dict[tuple[int, int], list[int]]:
    """(dense user index, position t) -> the retriever's candidates after that prefix (dense ids,
    retriever order), from candidates_train_prefixes.jsonl rows (`pipeline.candidates.read_prefix_rows`)."""
    users = {uid: u for u, uid in enumerate(ds.user_ids)}
    items = ds.item_index()
    out: dict[tuple[int, int], list[int]] = {}
    for row in rows:
        u = users.get(row["user"])
        if u is None:
            raise PipelineError(
                f"candidates_train_prefixes row for unknown user {row['user']!r}: regenerate it with the same data config"
            )
        seq = ds.train_sequence(u)
        for t, target, cands in zip(row["positions"], row["targets"], row["candidates"]):
            if not 1 <= t < len(seq) or items.get(target) != seq[t]:
                raise PipelineError(
                    f"candidates_train_prefixes row of user {row['user']!r} has target {target!r} at position {t}, not the "
                    "user's train item there: it was not made from this dataset's train split; re-run the retriever "
                    "with the same data config"
                )
            dense = [items.get(i) for i in cands]
            if None in dense:
                raise PipelineError(
                    f"candidates_train_prefixes row of user {row['user']!r} has unknown item "
                    f"{cands[dense.index(None)]!r}: regenerate it with the same data config"
                )
            out[(u, t)] = dense
    return out
