"""Training examples (`rerank.training.collate`): only the answer's label tokens (+ end of turn) carry loss,
the training tokens start with exactly the inference prompt's tokens, left-padded batches."""
from __future__ import annotations

import pytest
import torch

from rerank.prompting.labels import LETTERS, NUMBERS, encode
from rerank.prompting.prompts import build_prompt, build_training_text, label_tokens
from rerank.prompting.style import make_style
from rerank.training.collate import IGNORE_INDEX, TrainingTexts, collator_for, encode_example
from rerank.training.samples import TrainSample
from tests.helpers.tokenizers import qwen_tokenizer, titles

HISTORY = titles(3, "seen ")
CANDS = titles(12, "cand ")


def _style(scheme, template="chat"):
    return make_style(qwen_tokenizer(), scheme, template=template, max_history=5)


@pytest.mark.parametrize("template", ["chat", "alpaca"])
@pytest.mark.parametrize(
    "scheme,target_index,n_label_tokens",
    [(LETTERS, 4, 1), (NUMBERS, 2, 1), (NUMBERS, 11, 2)],  # "E"; "3"; "12" = "1" "2" with Qwen
)
@pytest.mark.parametrize("end_of_turn", [True, False])
def test_only_the_answer_tokens_carry_loss(template, scheme, target_index, n_label_tokens, end_of_turn):
    tok, style = qwen_tokenizer(), _style(scheme, template)
    tokens = label_tokens(tok, style)
    ex = encode_example(HISTORY, CANDS, target_index, tok, style, tokens, supervise_end_of_turn=end_of_turn)
    n = len(encode(tok, build_prompt(HISTORY, CANDS, tok, style)))
    label = scheme.labels[target_index]
    want = list(tokens.label_ids[target_index]) + ([tokens.terminator_id] if end_of_turn else [])
    assert len(tokens.label_ids[target_index]) == n_label_tokens
    supervised = [i for i, v in enumerate(ex["labels"]) if v != IGNORE_INDEX]
    assert supervised == list(range(n, n + len(want)))  # right after the prompt, nowhere else
    assert [ex["labels"][i] for i in supervised] == want == ex["input_ids"][n : n + len(want)]
    # The supervised tokens read back as the label (then the end of turn / EOS).
    assert tok.decode(want[:n_label_tokens]) == label
    end = "<|im_end|>" if template == "chat" else tok.eos_token
    if end_of_turn:
        assert tok.decode(want[-1:]) == end


@pytest.mark.parametrize("scheme", [LETTERS, NUMBERS])
@pytest.mark.parametrize("template", ["chat", "alpaca"])
def test_training_tokens_start_with_the_inference_prompt(scheme, template):
    tok, style = qwen_tokenizer(), _style(scheme, template)
    for target_index in (0, 9, 11):
        prompt = build_prompt(HISTORY, CANDS, tok, style)
        text = build_training_text(HISTORY, CANDS, target_index, tok, style)
        assert text.startswith(prompt) and text[len(prompt) :].startswith(scheme.labels[target_index])
        ex = encode_example(HISTORY, CANDS, target_index, tok, style, label_tokens(tok, style))
        assert ex["input_ids"] == encode(tok, text)
        assert ex["input_ids"][: len(encode(tok, prompt))] == encode(tok, prompt)


def test_dataset_uses_the_sample_titles_and_target():
    tok, style = qwen_tokenizer(), _style(LETTERS)
    all_titles = ["", *titles(20)]
    sample = TrainSample(user=0, position=3, history=(1, 2, 3), candidates=(7, 4, 9, 12), target_index=2)
    got = TrainingTexts([sample], all_titles, tok, style)[0]
    want = encode_example(
        [all_titles[i] for i in (1, 2, 3)], [all_titles[i] for i in (7, 4, 9, 12)], 2, tok, style, label_tokens(tok, style)
    )
    assert got == want
    answer = [v for v in got["labels"] if v != IGNORE_INDEX]
    assert tok.decode(answer) == "C<|im_end|>"  # candidate 3 of 4 is the target


def test_left_padding_puts_every_answer_at_the_end():
    tok, style = qwen_tokenizer(), _style(NUMBERS)
    tokens = label_tokens(tok, style)
    feats = [
        encode_example(HISTORY, CANDS, 11, tok, style, tokens),  # "12": 2 label tokens
        encode_example([], CANDS[:4], 0, tok, style, tokens),  # shorter prompt, "1"
    ]
    batch = collator_for(tok)(feats)
    lens = [len(f["input_ids"]) for f in feats]
    width = max(lens)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, width)
    for r, f in enumerate(feats):
        pad = width - lens[r]
        assert batch["attention_mask"][r].tolist() == [0] * pad + [1] * lens[r]
        assert batch["input_ids"][r, pad:].tolist() == f["input_ids"]
        assert batch["input_ids"][r, :pad].eq(tok.pad_token_id).all()
        assert batch["labels"][r].tolist() == [IGNORE_INDEX] * pad + f["labels"]
    # Both answers end at the same column: the same distance from the end of the row.
    last_supervised = [(row != IGNORE_INDEX).nonzero().max().item() for row in batch["labels"]]
    assert last_supervised[0] == last_supervised[1]
    assert batch["labels"].dtype == torch.long
