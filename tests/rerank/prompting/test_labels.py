"""Label schemes and their token ids at the answer position (`rerank.prompting.labels`)."""
from __future__ import annotations

import typing

import pytest

from pipeline.config import RerankerConfig, load_config
from pipeline.errors import PipelineError
from rerank.prompting.labels import (
    BUILTIN_SCHEMES,
    LETTERS,
    NUMBERS,
    LabelScheme,
    derive_label_tokens,
    encode,
    get_scheme,
    scheme_from_config,
)
from rerank.prompting.prompts import answer_end, build_prompt, build_training_text, label_tokens
from rerank.prompting.style import make_style
from tests.helpers.tokenizers import TOKENIZERS, qwen_tokenizer, titles


def test_builtin_schemes_have_20_labels_in_order():
    assert LETTERS.labels == tuple("ABCDEFGHIJKLMNOPQRST")
    assert NUMBERS.labels == tuple(str(i) for i in range(1, 21))


def test_first_k_labels_and_answer_instruction_follow_k():
    assert LETTERS.for_k(5) == ("A", "B", "C", "D", "E")
    assert LETTERS.answer_instruction(20) == "Answer with only one letter (A-T)."
    assert LETTERS.answer_instruction(5) == "Answer with only one letter (A-E)."
    assert NUMBERS.answer_instruction(20) == "Answer with only one number (1-20)."
    assert NUMBERS.answer_instruction(7) == "Answer with only one number (1-7)."


@pytest.mark.parametrize("scheme", [LETTERS, NUMBERS])
def test_more_than_20_candidates_is_an_error(scheme):
    with pytest.raises(PipelineError, match="21 candidates"):
        scheme.for_k(21)
    with pytest.raises(PipelineError):
        scheme.for_k(0)


def test_custom_scheme_from_config_needs_no_code_changes():
    cfg = load_config(None, ["reranker.label_scheme=custom", "reranker.custom_labels=[x, y, z]"]).reranker
    scheme = scheme_from_config(cfg)
    assert scheme.name == "custom" and scheme.labels == ("x", "y", "z")
    assert scheme.answer_instruction(3) == "Answer with only one label (x-z)."
    with pytest.raises(PipelineError):
        scheme.for_k(4)


def test_config_scheme_names_match_the_registry():
    names = typing.get_args(typing.get_type_hints(RerankerConfig)["label_scheme"])
    assert set(names) == set(BUILTIN_SCHEMES) | {"custom"}
    for name in BUILTIN_SCHEMES:
        assert scheme_from_config(load_config(None, [f"reranker.label_scheme={name}"]).reranker) is BUILTIN_SCHEMES[name]


def test_bad_label_lists_are_refused():
    with pytest.raises(PipelineError, match="repeats"):
        LabelScheme("custom", ("a", "b", "a"), "{first}-{last}")
    with pytest.raises(PipelineError, match="whitespace"):
        LabelScheme("custom", (" A", "B"), "{first}-{last}")
    with pytest.raises(PipelineError, match="placeholders"):
        LabelScheme("custom", ("a", "b"), "Pick one.")
    with pytest.raises(PipelineError, match="custom_labels"):
        get_scheme("custom")
    with pytest.raises(PipelineError, match="unknown label scheme"):
        get_scheme("roman")


def _answer_tokens(tok, text: str, prompt: str) -> list[int]:
    """What the model sees after the prompt in a training text (checks the prompt is a prefix)."""
    ids, prompt_ids = encode(tok, text), encode(tok, prompt)
    assert ids[: len(prompt_ids)] == prompt_ids
    return ids[len(prompt_ids) :]


@pytest.mark.parametrize("tok_name", ["qwen", "smollm2"])
@pytest.mark.parametrize("scheme", [LETTERS, NUMBERS])
def test_label_ids_are_the_tokens_at_the_answer_position(tok_name, scheme):
    tok = TOKENIZERS[tok_name]()
    style = make_style(tok, scheme)
    history, cands = titles(8, "h "), titles(20, "c ")
    prompt = build_prompt(history, cands, tok, style)
    lt = label_tokens(tok, style, prompt=prompt)
    # The reference prompt (what the ranker derives once) gives the same ids as this real prompt.
    assert label_tokens(tok, style) == lt
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")  # both are ChatML models
    assert lt.terminator_id == end_of_turn
    for i in range(20):
        text = build_training_text(history, cands, i, tok, style)
        seen = _answer_tokens(tok, text, prompt)
        # Training sees the label then the end of turn; the ranker scores a prefix of that.
        assert tuple(seen[: len(lt.trained_ids[i])]) == lt.trained_ids[i] == lt.label_ids[i] + (end_of_turn,)
        assert lt.trained_ids[i][: len(lt.scored_ids[i])] == lt.scored_ids[i]
        assert tok.decode(list(lt.label_ids[i])) == scheme.labels[i]


@pytest.mark.parametrize("tok_name", ["qwen", "smollm2"])
def test_letters_are_single_tokens_numbers_10_to_20_are_two(tok_name):
    tok = TOKENIZERS[tok_name]()
    letters = label_tokens(tok, make_style(tok, LETTERS))
    assert letters.multi_token_labels == () and letters.prefix_free
    numbers = label_tokens(tok, make_style(tok, NUMBERS))
    assert numbers.multi_token_labels == tuple(str(i) for i in range(10, 21))
    assert all(len(numbers.label_ids[i]) == 2 for i in range(9, 20))
    assert numbers.describe().startswith("20 labels, multi-token: 10, 11, 12")
    # Digits split: "1" is a prefix of "10" by tokens ...
    assert numbers.label_ids[9][:1] == numbers.label_ids[0] and not numbers.prefix_free
    # ... so "1" and "2" (prefixes of "10".."19", "20") are scored with the terminator, the rest
    # by their tokens alone; the scored sequences are then not prefixes of one another.
    scored = numbers.scored_ids
    end = numbers.terminator_id
    assert scored[0] == numbers.label_ids[0] + (end,) and scored[1] == numbers.label_ids[1] + (end,)
    assert all(scored[i] == numbers.label_ids[i] for i in range(2, 20))
    assert numbers.describe().endswith(f"scored with terminator id {end}: 1, 2")
    for a in scored:
        for b in scored:
            assert a == b or b[: len(a)] != a


@pytest.mark.parametrize("tok_name", ["qwen", "smollm2"])
def test_terminator_is_scored_only_after_a_label_that_another_in_use_extends(tok_name):
    tok = TOKENIZERS[tok_name]()
    numbers = label_tokens(tok, make_style(tok, NUMBERS))
    end = numbers.terminator_id
    # K=10: only "1" is extended (by "10"); K <= 9: nothing is, so no terminator at all.
    ten = numbers.for_k(10)
    assert ten.scored_ids[0] == ten.label_ids[0] + (end,) and ten.scored_ids[1:] == ten.label_ids[1:]
    assert numbers.for_k(9).scored_ids == numbers.label_ids[:9]
    assert numbers.for_k(12).scored_ids[1] == numbers.label_ids[1]  # "2" is extended only by "20"
    # Letters are single tokens and never extend one another: the paper's pure one-pass scoring.
    letters = label_tokens(tok, make_style(tok, LETTERS))
    assert letters.scored_ids == letters.label_ids and all(len(ids) == 1 for ids in letters.scored_ids)
    assert letters.trained_ids == tuple(ids + (end,) for ids in letters.label_ids)
    # Custom labels: digits split, so "x1" is "x" then "1" and extends "x"; "y" extends nothing.
    lt = label_tokens(tok, make_style(tok, get_scheme("custom", ["x", "x1", "y"])))
    assert lt.label_ids[1][:1] == lt.label_ids[0]
    assert lt.scored_ids == (lt.label_ids[0] + (end,), lt.label_ids[1], lt.label_ids[2])


def test_qwen_answer_label_is_not_the_space_prefixed_token():
    # The reference's defect: it read " A" (with a space) while training "A" after a newline.
    tok = qwen_tokenizer()
    lt = label_tokens(tok, make_style(tok, LETTERS))
    assert lt.label_ids[0] == tuple(encode(tok, "\nA")[1:])
    assert lt.label_ids[0] != tuple(encode(tok, " A"))


def test_for_k_keeps_the_first_k_labels():
    tok = qwen_tokenizer()
    lt = label_tokens(tok, make_style(tok, NUMBERS))
    five = lt.for_k(5)
    assert five.labels == ("1", "2", "3", "4", "5") and five.prefix_free and five.label_ids == lt.label_ids[:5]
    with pytest.raises(PipelineError):
        lt.for_k(21)


def test_labels_that_tokenize_identically_are_refused():
    tok = qwen_tokenizer()  # NFC-normalises: precomposed "é" and "e" + combining acute are one token string
    scheme = get_scheme("custom", ["\u00e9", "e\u0301"])
    with pytest.raises(PipelineError, match="same ids"):
        label_tokens(tok, make_style(tok, scheme))


def test_a_label_containing_the_end_of_turn_is_refused():
    tok = qwen_tokenizer()
    scheme = get_scheme("custom", ["x", "y<|im_end|>"])
    with pytest.raises(PipelineError, match="end-of-turn"):
        label_tokens(tok, make_style(tok, scheme))


def test_a_prompt_boundary_that_merges_with_the_label_is_refused():
    tok = qwen_tokenizer()
    # "Answer: " + "A" tokenizes as "Answer", ":", " A": the prompt's trailing space token vanishes.
    with pytest.raises(PipelineError, match="merges with the end of the prompt"):
        derive_label_tokens(LETTERS.labels, tok, "Answer: ", "<|im_end|>")


def test_a_label_that_merges_with_the_end_of_turn_is_refused():
    tok = qwen_tokenizer()
    # A plain-text end of turn "ing" fuses with label "Go" into the single token "Going".
    assert len(encode(tok, "Going")) == 1
    with pytest.raises(PipelineError, match="merges with the end-of-turn"):
        derive_label_tokens(["Go"], tok, "Answer:\n", "ing")


def test_missing_end_of_turn_is_refused():
    with pytest.raises(PipelineError, match="terminator"):
        derive_label_tokens(LETTERS.labels, qwen_tokenizer(), "Answer:\n", "")


def test_answer_end_is_the_chatml_end_of_turn():
    tok = qwen_tokenizer()
    assert answer_end(tok, make_style(tok, LETTERS)) == "<|im_end|>\n"
