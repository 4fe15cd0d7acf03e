"""One-pass ranking: each candidate's score is the log-probability of its label at the answer position.

`score_prompts` runs ONE forward pass over a left-padded batch of prompts and projects only the
last position onto the vocabulary (`logits_to_keep=1`: the full (sequence x vocabulary) logits are
never formed). Its log-softmax gives every single-token label's score at once, as in the paper.
Labels scored by more than one token (`LabelTokens.scored_ids`: multi-token labels, and the
terminator after a label that another label extends, e.g. "1" + end-of-turn next to "10") need the
distribution after each distinct proper prefix. Those prefixes form a trie; each of its deepest
internal nodes is fed as a short continuation (a few tokens) on the KV cache of the same pass, one
cache row per path, and every label's score is the sum of log-probs along its path.

`rank_rows` turns candidates-file rows into prompts (`rerank.prompting.prompts.encode_prompt`), scores them, and returns
each row's scores in the order of its `candidates`; `permutations > 1` averages each candidate's
score over several seeded candidate orders (position-bias control).
"""
from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from pipeline.errors import PipelineError
from rerank.model.readout import forward_inputs, has_readout, padded_ends, readout_scores
from rerank.prompting.labels import LabelTokens
from rerank.prompting.prompts import LineSpans, check_lines_shown, encode_prompt, encode_prompt_ends, label_tokens, needs_lines
from rerank.prompting.style import PromptStyle

# Prompts per forward pass. 16 prompts of ~600 tokens (20 history + 20 candidates) take a few GB
# of activations and KV cache even for a 7B model in bf16; on 2 CPU cores larger batches gain
# nothing. Prompts are sorted by length first, so a batch wastes little padding.
DEFAULT_BATCH_SIZE = 16


# ----------------------------------------------------------------------------------------
# The trie of scored sequences


@dataclass(frozen=True)
class _Plan:
    """What runs after the first pass. `paths`: the trie's deepest internal nodes (proper prefixes
    of scored sequences that no other such prefix extends), each fed after the prompt; `where`:
    every internal node -> (path index, position in that path) whose output is the distribution
    after that prefix. No paths when every scored sequence is one token (letters)."""

    paths: tuple[tuple[int, ...], ...]
    where: dict[tuple[int, ...], tuple[int, int]]

    @property
    def depth(self) -> int:
        return max((len(p) for p in self.paths), default=0)


def _plan(scored: Sequence[tuple[int, ...]]) -> _Plan:
    prefixes = {seq[:d] for seq in scored for d in range(1, len(seq))}
    deepest = sorted(p for p in prefixes if not any(len(q) > len(p) and q[: len(p)] == p for q in prefixes))
    where: dict[tuple[int, ...], tuple[int, int]] = {}
    for m, path in enumerate(deepest):
        for d in range(1, len(path) + 1):
            where.setdefault(path[:d], (m, d - 1))
    return _Plan(tuple(deepest), where)


# ----------------------------------------------------------------------------------------
# Scoring


def score_prompts(
    model: PreTrainedModel,
    prompts_ids: Sequence[Sequence[int] | np.ndarray],
    label_tokens: LabelTokens,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pad_id: int | None = None,
    progress: bool = True,
    ends: Optional[Sequence[Sequence[int] | LineSpans]] = None,
) -> list[list[float]]:
    """log P(label_tokens.scored_ids[i] | prompt) for every prompt (row) and label i (column); for
    a model with the readout head (`rerank.model.readout`), its score of candidate i, read at `ends`
    (per prompt, each candidate line's last token: `prompts.encode_prompt_ends`). `LineSpans` for
    `ends` (a candidate_attention isolated style, either head) show each prompt's lines isolated.

    `prompts_ids`: token ids of prompts that end where the answer starts (`labels.encode` of
    `build_prompt`); `label_tokens`: already `for_k(K)` for K-candidate prompts; `pad_id`: the
    tokenizer's pad token (masked out, so any id works; None = the model config's). Results are
    in the input order whatever the batching."""
    if batch_size < 1:
        raise PipelineError(f"ranking batch size must be >= 1 (got {batch_size}): set reranker.rank_batch_size")
    if pad_id is None:
        pad_id = model.config.pad_token_id
    if pad_id is None:
        raise PipelineError("no pad token id for batched scoring: pass the tokenizer's pad_token_id")
    if any(len(p) == 0 for p in prompts_ids):
        raise PipelineError("an empty prompt cannot be scored: build prompts with rerank.prompting.prompts.build_prompt")
    readout = has_readout(model)
    if readout and ends is None:
        raise PipelineError("the readout head scores candidates at their line ends: pass ends (prompts.encode_prompt_ends)")
    if not readout and ends is not None and not all(isinstance(e, LineSpans) for e in ends):
        raise PipelineError(
            "a label head reads candidate lines only to show them isolated: pass ends only for a readout model "
            "or a candidate_attention isolated style (prompts.encode_prompt_ends)"
        )
    scored = label_tokens.scored_ids
    plan = _plan(scored)
    batches = length_ordered_batches([len(p) for p in prompts_ids], batch_size)
    out: list[list[float]] = [[] for _ in prompts_ids]
    device = model.get_input_embeddings().weight.device  # where the token ids go (also under a device map)
    was_training = model.training
    model.eval()  # no dropout; restored below, so a trainer can rank for validation mid-training
    try:
        with torch.inference_mode():
            for idx in tqdm(batches, desc="ranking", unit="batch", disable=not progress or len(batches) <= 1):
                batch = [prompts_ids[i] for i in idx]
                lines = None if ends is None else [ends[i] for i in idx]
                if readout:
                    input_ids, mask = pad_left(batch, pad_id, device)
                    scores = readout_scores(model, input_ids, mask, padded_ends(lines, [len(p) for p in batch], input_ids.shape[1], device))
                else:
                    scores = _score_batch(model, batch, scored, plan, pad_id, device, lines)
                for i, row in zip(idx, scores.tolist()):
                    out[i] = row
    finally:
        model.train(was_training)
    return out


def length_ordered_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """The ranker's batches: prompt indices sorted longest first (stable), cut every `batch_size`.
    Similar lengths share a batch (little padding), and the largest batch runs first, so running out
    of memory shows at once. Left padding makes a prompt's last float bits depend on its batch
    mates, so every path that must match `score_prompts` bit for bit batches with this."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _score_batch(
    model: PreTrainedModel,
    batch: list[Sequence[int] | np.ndarray],
    scored: Sequence[tuple[int, ...]],
    plan: _Plan,
    pad_id: int,
    device: torch.device,
    lines: Optional[Sequence[LineSpans]] = None,
) -> torch.Tensor:
    """(B, K) label scores for one batch: the prompt pass, then the trie's continuations. `lines`:
    each prompt's candidate lines, shown isolated (candidate_attention isolated)."""
    input_ids, mask = pad_left(batch, pad_id, device)
    spans = None if lines is None else padded_ends(lines, [len(p) for p in batch], input_ids.shape[1], device)
    return label_scores(model, input_ids, mask, scored, plan, pad_id, spans=spans)


def pad_left(batch: Sequence[Sequence[int] | np.ndarray], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of token-id lists padded on the left, so every prompt ends at the
    last column (where the answer starts)."""
    n, width = len(batch), max(len(p) for p in batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, ids in enumerate(batch):
        input_ids[r, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
        mask[r, width - len(ids) :] = 1
    return input_ids.to(device), mask.to(device)


def plan_for(label_tokens: LabelTokens) -> _Plan:
    """The continuation plan of `label_tokens.scored_ids` (what `label_scores` takes)."""
    return _plan(label_tokens.scored_ids)


def label_scores(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    mask: torch.Tensor,
    scored: Sequence[tuple[int, ...]],
    plan: _Plan,
    pad_id: int,
    normalized: bool = True,
    spans: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(B, K): log P(scored[k] | prompt) for left-padded prompts: THE definition of a label's score,
    used by the ranker (no grad) and by the "labels" training loss (with grad).

    `normalized=False` (the training loss) projects the answer position onto the label's first-token
    rows of the output layer only, not the whole vocabulary: the scores then lack the answer
    position's log-partition, a constant per prompt, so any softmax over the K labels is unchanged.
    Continuation positions (multi-token labels) are always normalised over the vocabulary, since
    their partitions differ between labels.
    `spans` (B, 2, K): each candidate line's first and last column (`padded_ends` of `LineSpans`):
    the lines are shown isolated (`rerank.model.readout.isolated_attention`); the answer position
    and the label's continuation see them all."""
    attention, positions = forward_inputs(model, mask, spans)
    need_cache = bool(plan.paths)
    first_ids = [seq[0] for seq in scored]
    # A wrapper without the model's methods (DistributedDataParallel in multi-process training) must
    # run its own forward, so gradients are synchronised: it takes the full path.
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    rows_only = (
        not normalized
        and type(head) is torch.nn.Linear  # a plain head (not LoRA-wrapped): its rows are the logits' weights
        and getattr(config, "final_logit_softcapping", None) is None
        and getattr(config, "logit_scale", None) is None
    )
    if rows_only:
        out = model.get_decoder()(input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=need_cache)
        rows = torch.as_tensor(first_ids, device=input_ids.device)
        bias = head.bias[rows] if head.bias is not None else None
        scores = F.linear(out.last_hidden_state[:, -1], head.weight[rows], bias).float()  # (B, K) label logits
    else:
        out = model(
            input_ids=input_ids, attention_mask=attention, position_ids=positions, use_cache=need_cache, logits_to_keep=1
        )
        if out.logits.shape[1] != 1:
            raise PipelineError(
                f"{type(model).__name__} ignores logits_to_keep and computed logits for every position: "
                "use a transformers causal LM class that supports it (all current ones do)"
            )
        first = out.logits[:, -1].float().log_softmax(-1)  # (B, V): log P(first token | prompt)
        scores = first[:, first_ids]  # (B, K)
    if not need_cache:
        return scores
    cont = _continuations(model, out.past_key_values, mask, positions[:, -1] + 1, plan, pad_id)  # (B, M, D, V)
    k_idx, m_idx, d_idx, tok = [], [], [], []
    for k, seq in enumerate(scored):
        for d in range(1, len(seq)):
            m, pos = plan.where[seq[:d]]
            k_idx.append(k), m_idx.append(m), d_idx.append(pos), tok.append(seq[d])
    terms = cont[:, m_idx, d_idx, tok]  # (B, T): log P(token d of label k | prompt + its prefix)
    return scores.index_add(1, torch.as_tensor(k_idx, device=scores.device), terms)


def _continuations(model: PreTrainedModel, cache: Any, mask: torch.Tensor, start: torch.Tensor, plan: _Plan, pad_id: int) -> torch.Tensor:
    """Log-probs after every token of every trie path, fed on the prompt's KV cache: (B, M, D, V).
    `start` (B,): the position of the answer's first token (after the prompt's last)."""
    n, m, depth = mask.shape[0], len(plan.paths), plan.depth
    if not hasattr(cache, "batch_repeat_interleave"):
        raise PipelineError(
            f"{type(model).__name__} returned no transformers Cache ({type(cache).__name__}), so multi-token "
            "labels cannot be scored on it: use letters, or a transformers causal LM class"
        )
    cache.batch_repeat_interleave(m)  # row r becomes rows r*m .. r*m+m-1, one per path
    # Shorter paths are right-padded: a causal model's earlier outputs do not see later tokens.
    paths = torch.tensor([p + (pad_id,) * (depth - len(p)) for p in plan.paths], device=mask.device)
    ids = paths.repeat(n, 1)  # (B*M, D), path j of prompt r at row r*m + j
    cont_mask = torch.cat([mask.repeat_interleave(m, 0), torch.ones_like(ids)], dim=1)
    # The continuation attends to every real prompt token (the 2D mask) from the position after it.
    positions = start.repeat_interleave(m)[:, None] + torch.arange(depth, device=mask.device)[None, :]
    out = model(
        input_ids=ids, attention_mask=cont_mask, position_ids=positions, past_key_values=cache, use_cache=True,
        logits_to_keep=depth,
    )
    return out.logits.float().log_softmax(-1).view(n, m, depth, -1)


# ----------------------------------------------------------------------------------------
# Candidates rows


def candidate_orders(k: int, permutations: int, seed: int, user: str) -> list[list[int]]:
    """`permutations` candidate orders for one row (lists of candidate indices, slot by slot): the
    original order first, then seeded shuffles. Seeded by (seed, user), so a user's orders do not
    depend on which other rows are ranked with it."""
    if permutations < 1:
        raise PipelineError(f"permutations must be >= 1 (got {permutations}): set reranker.rank_permutations")
    rng = random.Random(f"{seed}:{user}")
    orders = [list(range(k))]
    for _ in range(permutations - 1):
        order = list(range(k))
        rng.shuffle(order)
        orders.append(order)
    return orders


# (row index, candidate order slot by slot, prompt token ids, each candidate line's last token or None)
PromptJob = tuple[int, list[int], np.ndarray, Optional[list[int] | LineSpans]]


def encode_rows(
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    rows: Sequence[Mapping[str, Any]],
    titles_by_item: Mapping[str, str],
    permutations: int = 1,
    seed: int = 0,
    progress: bool = True,
    with_ends: bool = False,
) -> dict[int, list[PromptJob]]:
    """The tokenized prompts of candidates-file rows, grouped by candidate count K (the labels in
    use, and so the scored sequences, depend on K): one prompt per row and candidate order
    (`candidate_orders`). This is everything the ranker does before the model runs. `with_ends`:
    also each candidate line's last token (`prompts.encode_prompt_ends`), what the readout head reads."""
    check_lines_shown(style, with_ends)
    jobs: dict[int, list[PromptJob]] = defaultdict(list)
    for r, row in enumerate(tqdm(rows, desc="prompts", unit="row", disable=not progress)):
        cands = list(row["candidates"])
        history = [_title(titles_by_item, item) for item in row["history"]]
        titles = [_title(titles_by_item, item) for item in cands]
        for order in candidate_orders(len(cands), permutations, seed, str(row["user"])):
            shown = [titles[j] for j in order]
            if with_ends:
                ids, ends = encode_prompt_ends(history, shown, tokenizer, style)
            else:
                ids, ends = encode_prompt(history, shown, tokenizer, style), None
            # int32 arrays: a split's prompts are held at once (for length sorting), ~4 bytes a token.
            jobs[len(cands)].append((r, order, np.asarray(ids, dtype=np.int32), ends))
    return jobs


def score_orders(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    rows: Sequence[Mapping[str, Any]],
    titles_by_item: Mapping[str, str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    permutations: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> list[list[tuple[list[int], list[float]]]]:
    """Per row, one (order, slot_scores) pair per candidate order: `order[slot]` is the index in
    row["candidates"] of the candidate shown in `slot`, `slot_scores[slot]` its label's score. The
    first order is the retriever's (identity). Position-bias analyses read these; `rank_rows`
    averages them."""
    tokens = label_tokens(tokenizer, style)  # one derivation holds for every prompt of the style
    out: list[list[tuple[list[int], list[float]]]] = [[] for _ in rows]
    lines = needs_lines(style, has_readout(model))
    for k, group in encode_rows(tokenizer, style, rows, titles_by_item, permutations, seed, progress, with_ends=lines).items():
        scores = score_prompts(
            model, [ids for _, _, ids, _ in group], tokens.for_k(k), batch_size, tokenizer.pad_token_id, progress,
            ends=[ends for _, _, _, ends in group] if lines else None,
        )
        for (r, order, _, _), slot_scores in zip(group, scores):
            out[r].append((order, slot_scores))
    return out


def rank_rows(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    rows: Sequence[Mapping[str, Any]],
    titles_by_item: Mapping[str, str],
    batch_size: int = DEFAULT_BATCH_SIZE,
    permutations: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> list[list[float]]:
    """Reranker scores for candidates-file rows (original item ids), each list in the order of its
    row's `candidates`. A prompt shows the history titles and the candidate titles labelled by slot.
    `permutations` = 1: the retriever's order (the paper); P > 1: each candidate's score is the mean
    over P candidate orders, the first the original one, the rest seeded by (seed, user)."""
    per_order = score_orders(model, tokenizer, style, rows, titles_by_item, batch_size, permutations, seed, progress)
    return average_orders(rows, per_order, permutations)


def average_orders(
    rows: Sequence[Mapping[str, Any]], per_order: Sequence[Sequence[tuple[list[int], list[float]]]], permutations: int
) -> list[list[float]]:
    """Each row's scores in the order of its `candidates`: the mean over its candidate orders of the
    score its label got (`score_orders`' output), summed in the orders' sequence."""
    out = [[0.0] * len(row["candidates"]) for row in rows]
    for r, pairs in enumerate(per_order):
        for order, slot_scores in pairs:
            for slot, j in enumerate(order):  # the candidate in `slot` is candidates[j]
                out[r][j] += slot_scores[slot] / permutations
    return out


def _title(titles_by_item: Mapping[str, str], item: str) -> str:
    try:
        return titles_by_item[item]
    except KeyError:
        raise PipelineError(
            f"item {item!r} has no title: the candidates file was made from another dataset; regenerate it with the same data config"
        ) from None
