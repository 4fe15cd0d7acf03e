"""The prompt builder: ONE format for training and inference.

`build_prompt` turns a user's history titles (chronological) and candidate titles into the text
that ends exactly where the model's answer starts. `build_training_text` is that prompt + the
answer label + the end of turn, byte-identical to the prompt up to the answer. `PromptStyle`
holds every setting that shapes the text; it is saved beside a model/adapter (prompt_style.json)
and loaded back so inference uses exactly the format that was trained.

Layout (LlamaRec-style): an instruction; "User history:" with the last `max_history` items
numbered 1..n; "Candidate pool:" with each candidate after its label ("A) Title"); the answer
instruction ("Answer with only one letter (A-T)."). With a chat template the instruction is the
system turn and the rest the user turn, rendered with add_generation_prompt=True; without one, an
Alpaca-style template ("### Instruction:" / "### Input:" / "### Response:\\n").
Titles are cut to `title_max_tokens` tokens; when the prompt exceeds `max_prompt_tokens`, history
items are dropped oldest first, never candidates.
"""
from __future__ import annotations

import bisect
import dataclasses
import json
import weakref
from typing import NamedTuple, Optional, Sequence

from transformers import PreTrainedTokenizerBase

from pipeline.errors import PipelineError
from rerank.prompting.labels import LabelTokens, derive_label_tokens, encode
from rerank.prompting.style import ALPACA_PREAMBLE, PromptStyle, check_tokenizer, render_chat
from rerank.prompting.titles import cut_title

# ----------------------------------------------------------------------------------------
# Rendering


def _input_text(history: Sequence[str], candidates: Sequence[str], labels: Sequence[str], style: PromptStyle) -> str:
    hist = [style.history_item_format.format(index=i, title=t) for i, t in enumerate(history, start=1)]
    cands = [style.candidate_format.format(label=lab, title=t) for lab, t in zip(labels, candidates)]
    return "\n".join(
        [
            style.history_header,
            *(hist or ["(none)"]),
            "",
            style.candidate_header,
            *cands,
            "",
            style.scheme.answer_instruction(len(candidates)),
        ]
    )


def history_text(history: Sequence[str], tokenizer: PreTrainedTokenizerBase, style: PromptStyle) -> str:
    """A history as the prompt shows it ("User history:" + numbered titles, each cut to
    `title_max_tokens`), with no template around it: the text of domain-adaptive pre-training
    (`pretrain_stage`), so stage 1 sees items in exactly the form the reranking prompts use."""
    titles = [cut_title(t, tokenizer, style.title_max_tokens) for t in history]
    lines = [style.history_item_format.format(index=i, title=t) for i, t in enumerate(titles, start=1)]
    return "\n".join([style.history_header, *lines])


def _bos_text(tokenizer: PreTrainedTokenizerBase) -> str:
    """The BOS string when the tokenizer normally starts sequences with it (Llama-style)."""
    bos_id = tokenizer.bos_token_id
    if bos_id is None or tokenizer.bos_token is None:
        return ""
    return tokenizer.bos_token if tokenizer("x")["input_ids"][:1] == [bos_id] else ""


def _render(tokenizer: PreTrainedTokenizerBase, style: PromptStyle, user_text: str) -> str:
    if style.template == "chat":
        return render_chat(tokenizer, style, user_text, generation_prompt=True)
    return (
        f"{_bos_text(tokenizer)}{ALPACA_PREAMBLE}\n\n### Instruction:\n{style.instruction}\n\n"
        f"### Input:\n{user_text}\n\n### Response:\n"
    )


def build_prompt(
    history: Sequence[str], candidates: Sequence[str], tokenizer: PreTrainedTokenizerBase, style: PromptStyle
) -> str:
    """The prompt for one user: `history` titles oldest first, `candidates` titles in label order
    (candidate i gets label i). Ends where the answer starts. Tokenize it with `labels.encode`."""
    return _fit(history, candidates, tokenizer, style)[0]


def encode_prompt(
    history: Sequence[str], candidates: Sequence[str], tokenizer: PreTrainedTokenizerBase, style: PromptStyle
) -> list[int]:
    """`labels.encode(tokenizer, build_prompt(...))`, without tokenizing the prompt a second time
    (fitting it into max_prompt_tokens already did)."""
    return _fit(history, candidates, tokenizer, style)[2]


class LineSpans(NamedTuple):
    """Each candidate line's first and last token in the prompt's ids: what a forward needs to show
    the lines apart under candidate_attention "isolated" (each line attends to the shared prefix and
    to itself only; either head)."""

    starts: list[int]
    ends: list[int]


def encode_prompt_ends(
    history: Sequence[str], candidates: Sequence[str], tokenizer: PreTrainedTokenizerBase, style: PromptStyle
) -> tuple[list[int], list[int] | LineSpans]:
    """(`encode_prompt(...)`, the index of the token that ends each candidate's line): what the
    readout head (`rerank.model.readout`) reads. Measured from the tokenizer's character offsets on the
    prompt text (the token holding the line's last character), and checked: that token must lie
    inside the line (it may also hold the newlines after it, never the next line's text).
    Under `style.candidate_attention` "isolated" the second item is a `LineSpans`: also the token
    holding each line's first character (it may also hold the newlines before it, never the
    previous line's text), so the model can be shown each line apart from the others."""
    prompt, user_text, ids = _fit(history, candidates, tokenizer, style)
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    if list(enc["input_ids"]) != ids:
        raise PipelineError("the tokenizer gives other ids with offsets than without: use a fast (Rust) tokenizer")
    base = prompt.rindex(user_text)  # the user text sits verbatim in the rendered prompt
    lines = user_text.split("\n")
    # The candidate lines come right before a blank line and the answer instruction (_input_text).
    tail = 2 + style.scheme.answer_instruction(len(candidates)).count("\n")
    first = len(lines) - tail - len(candidates)
    labels = style.scheme.for_k(len(candidates))
    for j, (lab, title) in enumerate(zip(labels, candidates)):
        want = style.candidate_format.format(label=lab, title=cut_title(title, tokenizer, style.title_max_tokens))
        if lines[first + j] != want:
            raise PipelineError(f"candidate {j + 1}'s prompt line is not where the prompt builder puts it: a bug in _input_text")
    starts = [base + sum(len(x) + 1 for x in lines[:i]) for i in range(len(lines))]
    token_ends = [end for _, end in enc["offset_mapping"]]
    out, firsts = [], []
    for j in range(len(candidates)):
        line_start, line = starts[first + j], lines[first + j]
        last_char = line_start + len(line) - 1
        t = bisect.bisect_right(token_ends, last_char)  # the first token ending after the last character
        start, end = enc["offset_mapping"][t]
        if not start <= last_char < end or start < line_start or prompt[last_char + 1 : end].strip("\n"):
            raise PipelineError(
                f"candidate {j + 1}'s line does not end on a token boundary with this tokenizer: "
                "the readout head cannot read it; use reranker.head=label_tokens"
            )
        out.append(t)
        t0 = bisect.bisect_right(token_ends, line_start)  # the token holding the line's first character
        if prompt[enc["offset_mapping"][t0][0] : line_start].strip("\n") or (firsts and t0 <= out[-2]):
            raise PipelineError(
                f"candidate {j + 1}'s line does not start on a token boundary with this tokenizer: "
                "its line cannot be shown apart; use reranker.candidate_attention=causal"
            )
        firsts.append(t0)
    return (ids, LineSpans(firsts, out)) if style.candidate_attention == "isolated" else (ids, out)


def needs_lines(style: PromptStyle, readout: bool) -> bool:
    """Whether scoring needs each candidate line's tokens (`encode_prompt_ends`): the readout head
    reads them, and isolated lines are shown apart by them (either head)."""
    return readout or style.candidate_attention == "isolated"


def check_lines_shown(style: PromptStyle, with_lines: bool) -> None:
    """Refuse to score a style with isolated candidate lines without their tokens: the forward would
    show the lines as written, another prompt than the one trained (e.g. generation, vLLM)."""
    if style.candidate_attention == "isolated" and not with_lines:
        raise PipelineError(
            "this prompt style shows candidate lines isolated, which only the one-pass ranker on a local model does: "
            "score it with rank_rows / the local backend, or train with reranker.candidate_attention=causal"
        )


def _fit(
    history: Sequence[str], candidates: Sequence[str], tokenizer: PreTrainedTokenizerBase, style: PromptStyle
) -> tuple[str, str, list[int]]:
    """(prompt, its user text, its token ids) with the most recent history that fits max_prompt_tokens."""
    check_tokenizer(style, tokenizer)
    labels = style.scheme.for_k(len(candidates))
    cands = [cut_title(t, tokenizer, style.title_max_tokens) for t in candidates]
    shown = list(history)[-style.max_history :] if style.max_history else []
    hist = [cut_title(t, tokenizer, style.title_max_tokens) for t in shown]

    def render(n_keep: int) -> tuple[str, str, list[int]]:
        kept = hist[len(hist) - n_keep :]  # the n_keep most recent items
        user_text = _input_text(kept, cands, labels, style)
        prompt = _render(tokenizer, style, user_text)
        return prompt, user_text, encode(tokenizer, prompt)

    best = render(len(hist))
    if len(best[2]) <= style.max_prompt_tokens:
        return best
    best = render(0)
    if len(best[2]) > style.max_prompt_tokens:
        raise PipelineError(
            f"the {len(cands)} candidates alone make a {len(best[2])}-token prompt > max_prompt_tokens "
            f"{style.max_prompt_tokens}: raise reranker.max_prompt_tokens or lower reranker.title_max_tokens"
        )
    # Keep the most recent items that fit (drop oldest first, never a candidate). The length grows
    # with every item kept (a line more, indices renumbered), so bisect on the count.
    lo, hi = 0, len(hist)  # render(lo) fits, render(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        attempt = render(mid)
        if len(attempt[2]) <= style.max_prompt_tokens:
            lo, best = mid, attempt
        else:
            hi = mid
    return best


def answer_end(tokenizer: PreTrainedTokenizerBase, style: PromptStyle) -> str:
    """What the template writes after the answer: the chat template's end of turn (e.g.
    "<|im_end|>\\n"), or the EOS token for the alpaca template."""
    if style.template == "alpaca":
        if not tokenizer.eos_token:
            raise PipelineError("the alpaca template needs an EOS token to end the answer: use a tokenizer that has one")
        return tokenizer.eos_token
    label = style.scheme.labels[0]
    prompt = render_chat(tokenizer, style, "x", generation_prompt=True)
    full = render_chat(tokenizer, style, "x", generation_prompt=False, answer=label)
    return _split_end(prompt, full, label)


def _split_end(prompt: str, full: str, label: str) -> str:
    if not full.startswith(prompt + label):
        raise PipelineError(
            "the chat template renders an answered conversation differently from its generation prompt: "
            "use prompt_template alpaca for this tokenizer"
        )
    return full[len(prompt) + len(label) :]


def build_training_text(
    history: Sequence[str],
    candidates: Sequence[str],
    target_index: int,
    tokenizer: PreTrainedTokenizerBase,
    style: PromptStyle,
) -> str:
    """`build_prompt(...)` + the label of candidates[target_index] + the end of turn. With a chat
    template this is the template's rendering of the answered conversation, checked to start with
    the inference prompt byte for byte. Train on `LabelTokens.trained_ids[target_index]`, the tokens
    right after the prompt's tokens."""
    prompt, user_text, _ = _fit(history, candidates, tokenizer, style)
    labels = style.scheme.for_k(len(candidates))
    if not 0 <= target_index < len(labels):
        raise PipelineError(f"target index {target_index} is outside the {len(labels)} candidates: check the sampler")
    label = labels[target_index]
    if style.template == "alpaca":
        return prompt + label + answer_end(tokenizer, style)
    full = render_chat(tokenizer, style, user_text, generation_prompt=False, answer=label)
    return prompt + label + _split_end(prompt, full, label)


def label_tokens(
    tokenizer: PreTrainedTokenizerBase, style: PromptStyle, prompt: Optional[str] = None
) -> LabelTokens:
    """Token ids of every label of the style's scheme at the answer position (see `rerank.prompting.labels`).
    Derived on `prompt`, or on a reference prompt of this style: every prompt of a style ends with
    the same generation prompt, so the ids hold for all of them."""
    if prompt is None:
        # Derived once per (tokenizer, style): the ranker asks for them on every call, and the
        # derivation renders and tokenizes a prompt per label (~20 ms, a tenth of a small batch).
        per_tokenizer = _LABEL_TOKENS.setdefault(tokenizer, {})
        key = json.dumps(dataclasses.asdict(style), sort_keys=True, default=str)  # the style's every field
        if key not in per_tokenizer:
            k = len(style.scheme.labels)
            prompt = build_prompt(["History item"], [f"Candidate item {i}" for i in range(1, k + 1)], tokenizer, style)
            per_tokenizer[key] = derive_label_tokens(style.scheme.labels, tokenizer, prompt, answer_end(tokenizer, style))
        return per_tokenizer[key]
    return derive_label_tokens(style.scheme.labels, tokenizer, prompt, answer_end(tokenizer, style))


def check_labels_shown(tokenizer: PreTrainedTokenizerBase, style: PromptStyle) -> None:
    """Refuse a style whose candidate lines do not hold each label as the very tokens the model
    answers with (`label_tokens`): copying a label from its line to the answer is the label head's
    task. Qwen's tokenizer merges "(A" into one token, so a "(A) Title" prompt never shows "A"."""
    title = "Item"  # one token: title_max_tokens never cuts it, so each line reads as formatted here
    prompt = build_prompt([title], [title] * len(style.scheme.labels), tokenizer, style)
    answers = label_tokens(tokenizer, style).label_ids
    enc = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
    for i, lab in enumerate(style.scheme.labels):
        line = style.candidate_format.format(label=lab, title=title)
        start = prompt.index("\n" + line + "\n") + 1
        ids = [t for t, (s, _) in zip(enc["input_ids"], enc["offset_mapping"]) if start <= s < start + len(line)]
        want = list(answers[i])
        if not any(ids[j : j + len(want)] == want for j in range(len(ids) - len(want) + 1)):
            shown = [tokenizer.decode([t]) for t in ids]
            raise PipelineError(
                f"label {lab!r} is not its answer's tokens in its candidate line {line!r} (tokens {shown}): "
                "the model would answer with a token the prompt never shows; use another label_position or labels"
            )


# tokenizer -> PromptStyle (as JSON) -> its reference LabelTokens (entries go with their tokenizer).
_LABEL_TOKENS: "weakref.WeakKeyDictionary[PreTrainedTokenizerBase, dict[str, LabelTokens]]" = weakref.WeakKeyDictionary()
