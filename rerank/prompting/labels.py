"""Candidate label schemes and their token ids: the ONE place that decides how a candidate is named
in the prompt and which token ids score it.

A scheme is a list of label strings ("A".."T", "1".."20", or a custom list from the config). A prompt
with K candidates uses the first K labels; K beyond the list is an error.

Token ids are never taken from a bare label. `derive_label_tokens` tokenizes the real text the model
reads and is trained on, `prompt + label + answer_end` (answer_end = what the template writes after
the assistant's answer, e.g. "<|im_end|>\\n" in ChatML), and keeps the tokens after the prompt's own
tokens. That is the sequence at the answer position, whatever the tokenizer does with spaces or
newlines (the reference read " A" while it trained "A").

Scoring rule (decided here, used by the ranker): a label is scored by the exact log-probability of
its label tokens, followed by the terminator (the first token of answer_end: the end-of-turn token,
e.g. <|im_end|>, or EOS for the Alpaca template) ONLY when its tokens are a proper prefix of another
label's tokens among the labels in use (the first K). Qwen and SmolLM2 split digits, so with numbers
and K=20 "1" is a prefix of "10".."19" and "2" of "20": they are scored as "1"+terminator and
"2"+terminator, otherwise P("1") would also count every "1x" answer. With K <= 9 numbers, and with
letters at any K, no label extends another, so every label is scored by its label tokens alone: one
forward pass for single-token labels, as in the paper. These scored sequences are prefix-free for
every scheme (the terminator is in no label). Training supervises label + terminator always
(`LabelTokens.trained_ids`), so every probability the ranker reads, the terminator's after a full
label included, is one that was trained.
"""
from __future__ import annotations

import string
import unicodedata
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from transformers import PreTrainedTokenizerBase

from pipeline.config import RerankerConfig
from pipeline.errors import PipelineError

MAX_LABELS = 20  # the paper's candidate count (retriever top-20); the built-in schemes name 20


def encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """Token ids of `text` as the model receives them. Prompt strings carry their own special
    tokens (the chat template writes them), so the tokenizer must add none: the one tokenization
    rule for prompts, training texts and label derivation."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _check_label_strings(name: str, labels: Sequence[str]) -> None:
    """Labels are short visible strings. No whitespace or control character anywhere in a label: it
    is written as "(label) Title" on one prompt line, a newline would break the layout, and a space
    makes the label's tokens depend on the word before it."""
    if not labels:
        raise PipelineError(f"label scheme {name!r} has no labels: give at least one")
    for lab in labels:
        if not isinstance(lab, str) or not lab.strip() or lab != lab.strip():
            raise PipelineError(
                f"label scheme {name!r}: label {lab!r} must be a non-empty string without surrounding whitespace"
            )
        if any(ch.isspace() or unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in lab):
            raise PipelineError(
                f"label scheme {name!r}: label {lab!r} contains whitespace or a control character: "
                "use labels without spaces, tabs or newlines (e.g. A..T, 1..20, item_1)"
            )
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise PipelineError(f"label scheme {name!r} repeats label {dup[0]!r}: every label must be distinct")


@dataclass(frozen=True)
class LabelScheme:
    """A named list of candidate labels and the sentence that asks for one of them."""

    name: str  # "letters", "numbers" or "custom"
    labels: tuple[str, ...]  # label of candidate 1, 2, ...; a prompt with K candidates uses the first K
    # Sentence closing the prompt; {first} and {last} become the first and K-th label.
    answer_template: str

    def __post_init__(self) -> None:
        _check_label_strings(self.name, self.labels)
        if "{first}" not in self.answer_template or "{last}" not in self.answer_template:
            raise PipelineError(
                f"label scheme {self.name!r}: answer instruction {self.answer_template!r} must contain "
                "{first} and {last}: add both placeholders"
            )

    def for_k(self, k: int) -> tuple[str, ...]:
        """The labels of a prompt with `k` candidates (the first k of the scheme)."""
        if k < 1:
            raise PipelineError(f"a prompt needs at least one candidate (got {k}): check the candidates file")
        if k > len(self.labels):
            raise PipelineError(
                f"{k} candidates but label scheme {self.name!r} has only {len(self.labels)} labels: "
                f"use at most {len(self.labels)} candidates (retriever.top_k) or a custom scheme with more labels"
            )
        return self.labels[:k]

    def answer_instruction(self, k: int) -> str:
        """E.g. "Answer with only one letter (A-E)." for k=5."""
        labels = self.for_k(k)
        return self.answer_template.format(first=labels[0], last=labels[-1])

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "labels": list(self.labels), "answer_template": self.answer_template}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LabelScheme":
        return cls(name=d["name"], labels=tuple(d["labels"]), answer_template=d["answer_template"])


LETTERS = LabelScheme(
    name="letters",
    labels=tuple(string.ascii_uppercase[:MAX_LABELS]),  # A..T, as LlamaRec
    answer_template="Answer with only one letter ({first}-{last}).",
)
NUMBERS = LabelScheme(
    name="numbers",
    labels=tuple(str(i) for i in range(1, MAX_LABELS + 1)),  # 1..20
    answer_template="Answer with only one number ({first}-{last}).",
)
BUILTIN_SCHEMES: dict[str, LabelScheme] = {s.name: s for s in (LETTERS, NUMBERS)}
# Sentence for a custom scheme when the config gives none.
CUSTOM_ANSWER_TEMPLATE = "Answer with only one label ({first}-{last})."


def get_scheme(
    name: str, custom_labels: Optional[Sequence[str]] = None, answer_template: Optional[str] = None
) -> LabelScheme:
    """A built-in scheme by name, or "custom" built from `custom_labels` (no code changes needed to
    try a new scheme: set reranker.label_scheme=custom and reranker.custom_labels in the config)."""
    if name == "custom":
        if not custom_labels:
            raise PipelineError("label scheme 'custom' needs a list of labels: set reranker.custom_labels")
        return LabelScheme("custom", tuple(custom_labels), answer_template or CUSTOM_ANSWER_TEMPLATE)
    if name not in BUILTIN_SCHEMES:
        raise PipelineError(f"unknown label scheme {name!r}: use one of {', '.join([*BUILTIN_SCHEMES, 'custom'])}")
    if custom_labels:
        raise PipelineError(f"reranker.custom_labels is only used with label_scheme 'custom' (got {name!r}): remove it")
    scheme = BUILTIN_SCHEMES[name]
    if answer_template:
        scheme = LabelScheme(scheme.name, scheme.labels, answer_template)
    return scheme


def scheme_from_config(cfg: RerankerConfig) -> LabelScheme:
    """The scheme a `pipeline.config.RerankerConfig` asks for."""
    return get_scheme(cfg.label_scheme, cfg.custom_labels, cfg.answer_instruction)


# ----------------------------------------------------------------------------------------
# Token ids at the answer position


@dataclass(frozen=True)
class LabelTokens:
    """The token ids of each label at the answer position, for one tokenizer and prompt format."""

    labels: tuple[str, ...]
    label_ids: tuple[tuple[int, ...], ...]  # tokens of each label right after the prompt
    terminator_id: int  # first token after the label (end-of-turn / EOS); same for every label

    @property
    def scored_ids(self) -> tuple[tuple[int, ...], ...]:
        """What scores label i at ranking: log P(these tokens | prompt). The label tokens, plus the
        terminator only when they are a proper prefix of another label's tokens (e.g. "1" when "10"
        is in use); depends on K, so take it from `for_k(K)`. Prefix-free for every scheme."""
        return tuple(ids + (self.terminator_id,) if self._extended(ids) else ids for ids in self.label_ids)

    @property
    def trained_ids(self) -> tuple[tuple[int, ...], ...]:
        """What training supervises for label i: its tokens followed by the terminator, always (so
        the terminator's probability after a complete label, read by `scored_ids`, is trained)."""
        return tuple(ids + (self.terminator_id,) for ids in self.label_ids)

    def _extended(self, ids: tuple[int, ...]) -> bool:
        """True when `ids` is a proper prefix of another label's tokens."""
        return any(len(other) > len(ids) and other[: len(ids)] == ids for other in self.label_ids)

    @property
    def multi_token_labels(self) -> tuple[str, ...]:
        """Labels that take more than one token (e.g. "10".."20" with Qwen's digit splitting)."""
        return tuple(lab for lab, ids in zip(self.labels, self.label_ids) if len(ids) > 1)

    @property
    def prefix_free(self) -> bool:
        """True when no label's tokens are a prefix of another's, i.e. every label is scored by its
        tokens alone (no terminator). False for numbers 1..20 with Qwen ("1" vs "10")."""
        for i, a in enumerate(self.label_ids):
            for j, b in enumerate(self.label_ids):
                if i != j and len(a) <= len(b) and b[: len(a)] == a:
                    return False
        return True

    def describe(self) -> str:
        """One line for logs, e.g. "20 labels, multi-token: 10, ..., 20; scored with terminator id
        151645: 1, 2"."""
        multi = ", ".join(self.multi_token_labels) or "none"
        ended = ", ".join(lab for lab, ids in zip(self.labels, self.label_ids) if self._extended(ids)) or "none"
        return f"{len(self.labels)} labels, multi-token: {multi}; scored with terminator id {self.terminator_id}: {ended}"

    def for_k(self, k: int) -> "LabelTokens":
        """The first k labels (a prompt with k candidates)."""
        if not 1 <= k <= len(self.labels):
            raise PipelineError(f"{k} candidates but only {len(self.labels)} labels: use 1..{len(self.labels)} candidates")
        return LabelTokens(self.labels[:k], self.label_ids[:k], self.terminator_id)


def derive_label_tokens(
    labels: Sequence[str], tokenizer: PreTrainedTokenizerBase, prompt: str, answer_end: str
) -> LabelTokens:
    """Label and terminator token ids as they appear after `prompt` in `prompt + label + answer_end`.

    `prompt` must end where the answer starts (chat template with add_generation_prompt=True) and
    `answer_end` is what the template writes after the answer. Every prompt built with the same
    `PromptStyle` ends with the same generation prompt, so one derivation holds for all of them.
    Errors (PipelineError) when a tokenization boundary merges (the prompt's tokens are not a prefix
    of the joint tokens, or a label merges with the end of turn), when answer_end yields no token,
    when labels are not told apart (two labels give the same tokens, or a label contains the
    terminator)."""
    if not answer_end:
        raise PipelineError(
            "the prompt template writes nothing after the answer, so labels have no terminator: "
            "use a tokenizer whose chat template ends turns, or the alpaca template with an EOS token"
        )
    prompt_ids = encode(tokenizer, prompt)
    n = len(prompt_ids)
    label_ids: list[tuple[int, ...]] = []
    terminators: set[int] = set()
    for lab in labels:
        with_label = encode(tokenizer, prompt + lab)
        joint = encode(tokenizer, prompt + lab + answer_end)
        if with_label[:n] != prompt_ids or joint[:n] != prompt_ids:
            raise PipelineError(
                f"label {lab!r} merges with the end of the prompt into different tokens: "
                "end the prompt with a newline or special token before the answer (fix the prompt template)"
            )
        ids = tuple(with_label[n:])
        tail = tuple(joint[n:])
        if not ids:
            raise PipelineError(f"label {lab!r} produces no tokens with this tokenizer: choose another label")
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise PipelineError(
                f"label {lab!r} maps to the tokenizer's unknown token {tokenizer.unk_token!r}: the tokenizer "
                "cannot represent it; choose labels made of characters it knows (e.g. A..T or 1..20)"
            )
        if tail[: len(ids)] != ids or len(tail) <= len(ids):
            raise PipelineError(
                f"label {lab!r} merges with the end-of-turn text {answer_end!r}: choose labels that end a token"
            )
        label_ids.append(ids)
        terminators.add(tail[len(ids)])
    if len(terminators) != 1:
        raise PipelineError(
            f"the end of turn {answer_end!r} starts with different tokens after different labels: "
            "choose labels that do not merge with it"
        )
    (terminator,) = terminators
    seen: dict[tuple[int, ...], str] = {}
    for lab, ids in zip(labels, label_ids):
        if ids in seen:
            raise PipelineError(
                f"labels {seen[ids]!r} and {lab!r} tokenize to the same ids {list(ids)}: "
                "the scheme is ambiguous, choose distinct labels"
            )
        seen[ids] = lab
        if terminator in ids:
            raise PipelineError(f"label {lab!r} contains the end-of-turn token {terminator}: remove it from the label")
    # The model is trained and scored on these ids; they must spell the label that the prompt shows,
    # or the candidate named in the prompt is not the one scored (e.g. a normalising tokenizer
    # turns "e" + combining accent into "é").
    for lab, ids in zip(labels, label_ids):
        back = tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if back.strip() != lab:
            raise PipelineError(
                f"label {ascii(lab)} does not survive tokenization (its tokens decode to {ascii(back)}): "
                "the tokenizer cannot represent it; choose labels it keeps as written (e.g. A..T or 1..20)"
            )
    return LabelTokens(tuple(labels), tuple(label_ids), terminator)


def check_candidates_fit(scheme: LabelScheme, rows: Sequence[dict], source: str) -> None:
    """Refuse candidates rows (from `source`, a candidates file) with more candidates than `scheme`
    has labels, before any model work: otherwise the run would stop only when the first such
    prompt is built, after loading the model and training."""
    n = len(scheme.labels)
    for row in rows:
        k = len(row["candidates"])
        if k > n:
            raise PipelineError(
                f"{source}: user {row['user']!r} has {k} candidates but label scheme {scheme.name!r} has only {n} "
                f"labels: re-run the retriever with retriever.top_k <= {n}, or set reranker.label_scheme=custom "
                f"with at least {k} reranker.custom_labels"
            )
