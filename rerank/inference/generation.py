"""Generation-based ranking: the baseline the one-pass ranker replaces (the paper's Figure 3 contrast).

The same fine-tuned model writes its answer through transformers' `generate` (greedy decoding), and
the text is parsed back into candidate labels:

- "greedy": the exact training/inference prompt ("Answer with only one letter (A-T)."); the model
  was trained to answer one label, so this yields its top-1 only.
- "list": the same prompt with only the answer instruction changed (`list_style`) to ask for every
  label, best first, separated by commas: a full ranking, one label per few generated tokens.

Parsing (`parse_labels`, a pure function) splits the answer into label-like pieces on whitespace,
commas, semicolons, "|", ">" and arrows, and strips surrounding brackets and punctuation from each
piece ("(A)", "A.", "**A**" -> "A"); a piece counts when it is exactly one of the K labels in use
(labels are compared as whole pieces, so "1", "10" and "12" never mix, and "110" is invalid).
Pieces that are no label in use (words, titles, labels beyond K, lowercase letters) are counted as
invalid; a label seen again is counted as a duplicate and its first position kept. Pure punctuation
("-", "...") is a separator, not an invalid piece.

Scores (`order_scores`) turn the parsed order into one score per candidate, in `candidates` order,
so that `pipeline.metrics.candidate_rank` reads the generated rank: the label in position p (0 =
first) scores K - p; every candidate the answer does not name scores 0 and, by candidate_rank's tie
rule (earlier candidate first), keeps the retriever's order after the named ones. "greedy" places
only the first parsed label first (the rest in retriever order); "list" places every parsed label.
An unparseable answer therefore leaves the retriever's order unchanged.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.errors import PipelineError
from rerank.inference.ranker import encode_rows, length_ordered_batches
from rerank.prompting.labels import LabelTokens, encode
from rerank.prompting.prompts import label_tokens
from rerank.prompting.style import PromptStyle

Mode = Literal["greedy", "list"]
MODES: tuple[str, ...] = ("greedy", "list")
# Prompts per generate call. Matches analysis.generation_batch_size's default: decoding is
# step-by-step, so on 2 CPU cores a larger batch mostly adds padding work.
DEFAULT_BATCH_SIZE = 8

# The list-mode answer instruction, by scheme name ({first}/{last}: the first and K-th label). Only
# this sentence differs from the trained prompt. Unknown (custom) schemes say "labels".
LIST_ANSWER_TEMPLATES = {
    "letters": "Rank all candidates from most to least likely: answer with every letter ({first}-{last}) once, separated by commas.",
    "numbers": "Rank all candidates from most to least likely: answer with every number ({first}-{last}) once, separated by commas.",
}
LIST_ANSWER_TEMPLATE = (
    "Rank all candidates from most to least likely: answer with every label ({first}-{last}) once, separated by commas."
)
LIST_SEPARATOR = ", "  # what the list instruction asks for; sizes the default token budget

# Piece splitting: whitespace, commas, semicolons, "|", ">" and arrows separate labels.
_SEPARATORS = re.compile(r"[\s,;|>\u2192\u21d2]+")
# Stripped from both ends of a piece when the raw piece is not a label: brackets, quotes, markdown
# emphasis, trailing dots/colons, dashes ("(A)", "A.", "**A**", "'A'").
_STRIP = "()[]{}<>.:*\"'`-_!?"
# list mode's token budget beyond the expected answer (label + separator tokens + end of turn): a
# quarter more, at least this many, for other spacing ("A,B" vs "A, B") and a little preamble.
MIN_LIST_MARGIN = 4


# ----------------------------------------------------------------------------------------
# The prompt


def list_style(style: PromptStyle) -> PromptStyle:
    """`style` asking for every label best first: only the scheme's answer instruction changes."""
    template = LIST_ANSWER_TEMPLATES.get(style.scheme.name, LIST_ANSWER_TEMPLATE)
    return dataclasses.replace(style, scheme=dataclasses.replace(style.scheme, answer_template=template))


def style_for_mode(style: PromptStyle, mode: str) -> PromptStyle:
    """The prompt style of a generation mode: the trained one for "greedy", `list_style` for "list"."""
    check_mode(mode)
    return style if mode == "greedy" else list_style(style)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise PipelineError(f"unknown generation mode {mode!r}: use {' or '.join(MODES)} (analysis.generation_modes)")


# ----------------------------------------------------------------------------------------
# Parsing


@dataclass(frozen=True)
class ParsedAnswer:
    """An answer text read as labels."""

    labels: tuple[str, ...]  # valid labels in order of first occurrence
    invalid: tuple[str, ...]  # pieces that are no label in use, as written
    n_duplicates: int  # label occurrences after the first of the same label


def parse_labels(text: str, labels: Sequence[str]) -> ParsedAnswer:
    """Read `text` as a sequence of `labels` (the K labels in use); see the module docstring."""
    check_parseable(labels)
    known = set(labels)
    found: list[str] = []
    seen: set[str] = set()
    invalid: list[str] = []
    duplicates = 0
    for raw in _SEPARATORS.split(text):
        piece = raw if raw in known else raw.strip(_STRIP)
        if not piece:
            continue  # pure punctuation separates, it is not an answer
        if piece not in known:
            invalid.append(raw)
        elif piece in seen:
            duplicates += 1
        else:
            seen.add(piece)
            found.append(piece)
    return ParsedAnswer(tuple(found), tuple(invalid), duplicates)


def check_parseable(labels: Sequence[str]) -> None:
    """Labels must be whole pieces after splitting: none may contain a separator."""
    for lab in labels:
        if _SEPARATORS.search(lab):
            raise PipelineError(
                f"label {lab!r} contains a separator (whitespace , ; | > or an arrow), so a generated answer cannot be "
                "split into labels: use labels without them for the generation baseline"
            )


def order_scores(parsed: Sequence[str], labels: Sequence[str]) -> list[float]:
    """Score of each candidate (label i = candidate i) from a parsed order: K - position for the
    named labels, 0 for the rest (which candidate_rank then keeps in retriever order)."""
    index = {lab: i for i, lab in enumerate(labels)}
    k = len(labels)
    scores = [0.0] * k
    for pos, lab in enumerate(parsed):
        if lab not in index:
            raise PipelineError(f"label {lab!r} is not among the {k} labels in use: parse with parse_labels first")
        scores[index[lab]] = float(k - pos)
    return scores


# ----------------------------------------------------------------------------------------
# Generation


@dataclass
class GeneratedRanking:
    """One user's generated answer and what was read from it."""

    user: str
    mode: str  # "greedy" or "list"
    text: str  # the decoded new tokens (stop token and special tokens removed)
    labels_parsed: list[str]  # valid labels, first occurrences, in order
    invalid: list[str]  # pieces that are no label in use
    n_duplicates: int
    complete: bool  # every one of the K labels is named (what "list" asks for)
    stopped: bool  # the model ended its answer (stop token) within max_new_tokens
    new_tokens: int  # tokens generated, the stop token included
    scores: list[float]  # one per row["candidates"], see order_scores (greedy: first label only)

    @property
    def n_invalid(self) -> int:
        return len(self.invalid)

    @property
    def answered(self) -> bool:
        """At least one label could be read."""
        return bool(self.labels_parsed)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "n_invalid": self.n_invalid, "answered": self.answered}


def default_max_new_tokens(tokenizer: PreTrainedTokenizerBase, tokens: LabelTokens, mode: str) -> int:
    """Token budget for K = len(tokens.labels) candidates. greedy: the longest label + the stop
    token (what the model was trained to write). list: the expected answer (every label, joined by
    LIST_SEPARATOR) + the stop token, plus a quarter (at least MIN_LIST_MARGIN) for other spacing."""
    check_mode(mode)
    if mode == "greedy":
        return max(len(ids) for ids in tokens.label_ids) + 1
    expected = list_answer_tokens(tokenizer, tokens)
    return expected + max(MIN_LIST_MARGIN, expected // 4)


def list_answer_tokens(tokenizer: PreTrainedTokenizerBase, tokens: LabelTokens) -> int:
    """Tokens of a complete list answer for K = len(tokens.labels) candidates: every label joined
    by LIST_SEPARATOR, plus the stop token."""
    return len(encode(tokenizer, LIST_SEPARATOR.join(tokens.labels))) + 1


def generate_rankings(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
    rows: Sequence[Mapping[str, Any]],
    titles_by_item: Mapping[str, str],
    mode: Mode,
    batch_size: int = DEFAULT_BATCH_SIZE,
    max_new_tokens: Optional[int] = None,
    progress: bool = True,
    full_list: bool = False,
) -> list[GeneratedRanking]:
    """Greedy-decoded answers for candidates-file rows (original item ids), parsed into rankings,
    in the order of `rows`. `style`: the trained prompt style (list mode changes only its answer
    instruction); `max_new_tokens`: None = `default_max_new_tokens` per candidate count. Prompts are
    left-padded in batches of similar length; decoding stops at the end-of-turn token (the label
    terminator) or the tokenizer's EOS. `full_list` (list mode; benchmarks): no stop before the
    tokens of a complete list answer (`list_answer_tokens`), so every user costs a full ranking's
    decoding even where the model would stop earlier (a model tuned to answer one label does)."""
    check_mode(mode)
    if full_list and mode != "list":
        raise PipelineError(f"full_list applies to mode 'list' only (got mode {mode!r})")
    if batch_size < 1:
        raise PipelineError(f"generation batch size must be >= 1 (got {batch_size}): set analysis.generation_batch_size")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise PipelineError(f"max_new_tokens must be >= 1 (got {max_new_tokens}): pass None for the derived budget")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise PipelineError("the tokenizer has no pad token for batched generation: load it with rerank.model.sources.load_tokenizer")
    gen_style = style_for_mode(style, mode)
    check_parseable(gen_style.scheme.labels)
    tokens = label_tokens(tokenizer, gen_style)  # label ids (token budget) and the terminator
    stop_ids = sorted({tokens.terminator_id} | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()))
    device = model.get_input_embeddings().weight.device
    out: list[Optional[GeneratedRanking]] = [None] * len(rows)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for k, group in encode_rows(tokenizer, gen_style, rows, titles_by_item, progress=progress).items():
                labels = gen_style.scheme.for_k(k)
                budget = max_new_tokens or default_max_new_tokens(tokenizer, tokens.for_k(k), mode)
                # min_new_tokens: the stop tokens are suppressed until a complete list's worth is written.
                floor = list_answer_tokens(tokenizer, tokens.for_k(k)) - 1 if full_list else 0
                config = GenerationConfig(
                    max_new_tokens=max(budget, floor + 1), min_new_tokens=floor, do_sample=False, num_beams=1,
                    pad_token_id=pad_id, eos_token_id=stop_ids,
                )
                batches = length_ordered_batches([len(ids) for _, _, ids, _ in group], batch_size)  # little padding
                for idx in tqdm(batches, desc=f"generate ({mode})", unit="batch", disable=not progress or len(batches) <= 1):
                    batch = [group[i] for i in idx]
                    new = _generate_batch(model, [ids for _, _, ids, _ in batch], config, pad_id, device)
                    for (r, _, _, _), ids in zip(batch, new):
                        out[r] = _read(rows[r], mode, labels, ids, stop_ids, tokenizer)
    finally:
        model.train(was_training)
    return [g for g in out if g is not None]


def _generate_batch(
    model: PreTrainedModel, batch: Sequence[Sequence[int]], config: GenerationConfig, pad_id: int, device: torch.device
) -> list[list[int]]:
    """The new token ids of each prompt (everything generate wrote after the prompt, padding included)."""
    n, width = len(batch), max(len(p) for p in batch)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for r, ids in enumerate(batch):  # left padding: every prompt ends where its answer starts
        input_ids[r, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
        mask[r, width - len(ids) :] = 1
    seqs = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=config)
    return seqs[:, width:].tolist()


def _read(
    row: Mapping[str, Any],
    mode: str,
    labels: Sequence[str],
    new_ids: Sequence[int],
    stop_ids: Sequence[int],
    tokenizer: PreTrainedTokenizerBase,
) -> GeneratedRanking:
    """One row's GeneratedRanking from its generated ids (cut at the first stop token)."""
    stop = next((i for i, t in enumerate(new_ids) if t in stop_ids), None)
    answer = list(new_ids if stop is None else new_ids[:stop])
    text = tokenizer.decode(answer, skip_special_tokens=True)
    parsed = parse_labels(text, labels)
    placed = parsed.labels[:1] if mode == "greedy" else parsed.labels
    return GeneratedRanking(
        user=str(row["user"]),
        mode=mode,
        text=text,
        labels_parsed=list(parsed.labels),
        invalid=list(parsed.invalid),
        n_duplicates=parsed.n_duplicates,
        complete=len(parsed.labels) == len(labels),
        stopped=stop is not None,
        new_tokens=len(new_ids) if stop is None else stop + 1,
        scores=order_scores(placed, labels),
    )


# ----------------------------------------------------------------------------------------
# Accounting


def accounting(rankings: Sequence[GeneratedRanking]) -> dict[str, Any]:
    """How well-formed a mode's answers were, over users: fractions answered (>= 1 label) and
    complete (all K labels), users with / count of invalid pieces and duplicate labels, answers cut
    by the token budget (no stop token), mean labels parsed and mean new tokens."""
    n = len(rankings)
    if n == 0:
        raise PipelineError("no generated answers to account for: pass at least one row")
    return {
        "n_users": n,
        "answered": sum(g.answered for g in rankings) / n,
        "complete": sum(g.complete for g in rankings) / n,
        "users_with_invalid": sum(g.n_invalid > 0 for g in rankings),
        "invalid_pieces": sum(g.n_invalid for g in rankings),
        "users_with_duplicates": sum(g.n_duplicates > 0 for g in rankings),
        "duplicate_labels": sum(g.n_duplicates for g in rankings),
        "truncated": sum(not g.stopped for g in rankings),
        "mean_labels_parsed": sum(len(g.labels_parsed) for g in rankings) / n,
        "mean_new_tokens": sum(g.new_tokens for g in rankings) / n,
    }
