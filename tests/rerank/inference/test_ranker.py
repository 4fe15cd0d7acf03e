"""One-pass ranking (`rerank.inference.ranker`): scores equal plain forward / teacher-forced log-probs."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import PipelineError
from rerank.inference import ranker
from rerank.inference.ranker import _plan, candidate_orders, rank_rows, score_prompts
from rerank.model.sources import load_model_and_tokenizer
from rerank.model.standins import SMOLLM2, TINY_QWEN2
from rerank.prompting.labels import LETTERS, NUMBERS, encode, get_scheme
from rerank.prompting.prompts import build_prompt, label_tokens
from rerank.prompting.style import make_style
from tests.helpers.tokenizers import CACHE_DIR, titles

TOL = 1e-4  # float32 log-probs from differently shaped (padded / cached) computations


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model_and_tokenizer(TINY_QWEN2, cache_dir=CACHE_DIR)
    return model, tok


def _prompts(tok, style, k: int, history_lengths=(0, 6)) -> list[list[int]]:
    """Prompts of different lengths (so a batch is left-padded)."""
    return [encode(tok, build_prompt(titles(n, "h "), titles(k, "c "), tok, style)) for n in history_lengths]


def _teacher_forced(model, prompt: list[int], seqs) -> list[float]:
    """sum_d log P(seq[d] | prompt + seq[:d]) from a plain forward over prompt + seq (unpadded, no
    cache). Only the positions that predict seq's tokens are projected (the last len(seq) + 1,
    the very last predicting nothing): vocabulary logits at every position would make this
    reference, not the ranker, the slow part of the tests."""
    out = []
    with torch.no_grad():
        for seq in seqs:
            ids = torch.tensor([prompt + list(seq)])
            logp = model(ids, logits_to_keep=len(seq) + 1).logits[0].float().log_softmax(-1)
            out.append(sum(logp[d, t].item() for d, t in enumerate(seq)))
    return out


def _close(got, want, tol=TOL) -> None:
    assert len(got) == len(want)
    assert max(abs(a - b) for a, b in zip(got, want)) < tol, (got, want)


def test_letters_one_pass_equals_the_full_forward_log_probs(tiny):
    model, tok = tiny
    style = make_style(tok, LETTERS)
    lt = label_tokens(tok, style).for_k(20)
    assert all(len(s) == 1 for s in lt.scored_ids)  # letters: the pure one-pass case
    prompts = _prompts(tok, style, 20)
    got = score_prompts(model, prompts, lt, batch_size=2, pad_id=tok.pad_token_id, progress=False)
    for p, g in zip(prompts, got):
        with torch.no_grad():
            logp = model(torch.tensor([p])).logits[0, -1].float().log_softmax(-1)
        _close(g, [logp[s[0]].item() for s in lt.scored_ids])
        assert max(g) - min(g) > 1e-2  # the labels' scores differ, so a wrong position would show


@pytest.mark.parametrize(
    "labels,k",
    [
        (NUMBERS.labels, 20),  # "1", "2" + terminator; "10".."20" two tokens
        (NUMBERS.labels, 10),  # only "1" + terminator
        (("x", "x12", "y1", "y"), 4),  # trie paths of different depths: "x" "1" and "y"
    ],
)
def test_multi_token_labels_equal_teacher_forcing_in_a_left_padded_batch(tiny, labels, k):
    model, tok = tiny
    scheme = NUMBERS if labels == NUMBERS.labels else get_scheme("custom", list(labels))
    style = make_style(tok, scheme)
    lt = label_tokens(tok, style).for_k(k)
    assert any(len(s) > 1 for s in lt.scored_ids)
    prompts = _prompts(tok, style, k)
    got = score_prompts(model, prompts, lt, batch_size=len(prompts), pad_id=tok.pad_token_id, progress=False)
    for p, g in zip(prompts, got):
        _close(g, _teacher_forced(model, p, lt.scored_ids))


def test_trie_paths_are_the_deepest_proper_prefixes(tiny):
    _, tok = tiny
    lt = label_tokens(tok, make_style(tok, NUMBERS))
    one, two = lt.label_ids[0], lt.label_ids[1]
    assert _plan(lt.for_k(20).scored_ids).paths == tuple(sorted([one, two]))  # one cache row each
    assert _plan(lt.for_k(10).scored_ids).paths == (one,)
    assert _plan(lt.for_k(9).scored_ids).paths == ()  # nothing beyond the one pass
    x, x1, y = (5,), (5, 7), (6,)
    plan = _plan([x + (0,), x1 + (8,), y + (7,), y + (0,)])
    assert plan.paths == (x1, y) and plan.depth == 2
    assert plan.where == {x: (0, 0), x1: (0, 1), y: (1, 0)}


def test_length_ordered_batches_match_one_prompt_at_a_time_in_input_order(tiny):
    model, tok = tiny
    style = make_style(tok, NUMBERS)
    lt = label_tokens(tok, style).for_k(20)
    prompts = _prompts(tok, style, 20, history_lengths=(4, 0, 12, 1, 7))
    one_by_one = [score_prompts(model, [p], lt, batch_size=1, pad_id=tok.pad_token_id, progress=False)[0] for p in prompts]
    batched = score_prompts(model, prompts, lt, batch_size=2, pad_id=tok.pad_token_id, progress=False)
    for a, b in zip(batched, one_by_one):
        _close(a, b)
    # Each row really is its own prompt's: different prompts give different scores.
    assert max(abs(a - b) for a, b in zip(one_by_one[0], one_by_one[2])) > 1e-3


@pytest.mark.parametrize("scheme,most_positions", [(LETTERS, 1), (NUMBERS, 1), (get_scheme("custom", ["x", "x12", "y1", "y"]), 2)])
def test_the_output_head_only_sees_the_last_position_and_continuations(tiny, scheme, most_positions):
    model, tok = tiny
    style = make_style(tok, scheme)
    k = len(scheme.labels)
    lt = label_tokens(tok, style).for_k(k)
    seen: list[tuple[int, ...]] = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda mod, inp, out: seen.append(tuple(inp[0].shape)))
    try:
        score_prompts(model, _prompts(tok, style, k), lt, batch_size=2, pad_id=tok.pad_token_id, progress=False)
    finally:
        hook.remove()
    hidden = model.config.hidden_size
    assert seen and all(len(s) == 3 and s[2] == hidden and s[1] <= most_positions for s in seen), seen
    assert seen[0] == (2, 1, hidden)  # the prompt pass: the last position of each prompt only
    n_paths = len(_plan(lt.scored_ids).paths)
    assert len(seen) == (2 if n_paths else 1)  # letters: one pass; otherwise one continuation pass
    if n_paths:
        assert seen[1][0] == 2 * n_paths  # one cache row per prompt and trie path


def test_training_mode_is_restored_and_bad_input_is_refused(tiny):
    model, tok = tiny
    style = make_style(tok, LETTERS)
    lt = label_tokens(tok, style).for_k(20)
    prompts = _prompts(tok, style, 20, history_lengths=(1,))
    model.train()
    try:
        train_mode = score_prompts(model, prompts, lt, batch_size=1, pad_id=tok.pad_token_id, progress=False)
        assert model.training  # a trainer validating mid-training keeps training afterwards
    finally:
        model.eval()
    # ... and scoring itself ran without dropout (same scores as in eval mode).
    _close(train_mode[0], score_prompts(model, prompts, lt, pad_id=tok.pad_token_id, progress=False)[0], 1e-6)
    with pytest.raises(PipelineError, match="batch size"):
        score_prompts(model, prompts, lt, batch_size=0, pad_id=tok.pad_token_id)
    with pytest.raises(PipelineError, match="empty prompt"):
        score_prompts(model, [[]], lt, pad_id=tok.pad_token_id)


# ----------------------------------------------------------------------------------------
# rank_rows

ITEMS = {f"i{n}": t for n, t in enumerate(titles(40, "item "))}


def _row(user: str, k: int, offset: int = 0) -> dict:
    cands = [f"i{offset + j}" for j in range(k)]
    return {"user": user, "history": ["i30", "i31", "i32"], "candidates": cands, "scores": [0.0] * k, "target": cands[0]}


def test_one_permutation_equals_plain_scores_of_the_rows_prompts(tiny):
    model, tok = tiny
    style = make_style(tok, LETTERS)
    rows = [_row("u1", 20), _row("u2", 20, offset=5)]
    got = rank_rows(model, tok, style, rows, ITEMS, batch_size=2, permutations=1, progress=False)
    prompts = [
        encode(tok, build_prompt([ITEMS[i] for i in r["history"]], [ITEMS[i] for i in r["candidates"]], tok, style))
        for r in rows
    ]
    want = score_prompts(model, prompts, label_tokens(tok, style).for_k(20), pad_id=tok.pad_token_id, progress=False)
    assert got == want


def test_permutation_orders_are_seeded_and_start_with_the_original():
    orders = candidate_orders(20, 4, seed=7, user="u1")
    assert orders[0] == list(range(20)) and all(sorted(o) == list(range(20)) for o in orders)
    assert len({tuple(o) for o in orders}) == 4
    assert orders == candidate_orders(20, 4, seed=7, user="u1")
    assert orders != candidate_orders(20, 4, seed=8, user="u1")
    assert orders[1:] != candidate_orders(20, 4, seed=7, user="u2")[1:]  # users get their own orders
    with pytest.raises(PipelineError, match="permutations"):
        candidate_orders(20, 0, seed=0, user="u1")


def test_permutation_averaging_is_deterministic_with_the_real_model(tiny):
    model, tok = tiny
    style = make_style(tok, NUMBERS)
    rows = [_row("u1", 20), _row("u2", 12, offset=3)]  # two candidate counts: labels in use differ
    a = rank_rows(model, tok, style, rows, ITEMS, batch_size=4, permutations=3, seed=1, progress=False)
    b = rank_rows(model, tok, style, rows, ITEMS, batch_size=1, permutations=3, seed=1, progress=False)
    c = rank_rows(model, tok, style, rows, ITEMS, batch_size=4, permutations=1, progress=False)
    assert [len(s) for s in a] == [20, 12]
    for x, y in zip(a, b):
        _close(x, y)
    assert max(abs(x - y) for x, y in zip(a[0], c[0])) > 1e-3  # averaging over orders changes scores


def _fake_scorer(tok, favourite: str, calls: list):
    """A stand-in for score_prompts: a "model" that loves the item titled `favourite` wherever it
    stands, with a position bias (earlier slots score a little higher)."""

    def fake(model, prompts_ids, lt, batch_size, pad_id, progress=True, ends=None):
        assert ends is None  # a label-head "model": no readout line ends
        out = []
        for ids in prompts_ids:
            text = tok.decode(ids)
            slots = [line for line in text.split("\n") if line.partition(") ")[0] in lt.labels]  # "A) Title"
            assert len(slots) == len(lt.labels)  # labels for this prompt's K
            calls.append(slots)
            out.append([(10.0 if favourite in line else 0.0) - 0.1 * s for s, line in enumerate(slots)])
        return out

    return fake


@pytest.mark.parametrize("permutations", [1, 5])
def test_scores_follow_the_candidate_not_its_slot(tiny, monkeypatch, permutations):
    _, tok = tiny
    style = make_style(tok, LETTERS)
    calls: list = []
    fav = "i13"
    monkeypatch.setattr(ranker, "score_prompts", _fake_scorer(tok, ITEMS[fav], calls))
    rows = [_row("u1", 20), _row("u2", 8, offset=9)]
    got = rank_rows(None, tok, style, rows, ITEMS, permutations=permutations, seed=3, progress=False)
    assert len(calls) == 2 * permutations
    for row, scores in zip(rows, got):
        cands = row["candidates"]
        assert max(range(len(cands)), key=scores.__getitem__) == cands.index(fav)
        # Each candidate's score is the mean of its slots' scores over the row's orders.
        orders = candidate_orders(len(cands), permutations, 3, row["user"])
        for j, cand in enumerate(cands):
            want = sum((10.0 if cand == fav else 0.0) - 0.1 * o.index(j) for o in orders) / permutations
            assert scores[j] == pytest.approx(want)


def test_unknown_item_title_is_an_error(tiny):
    model, tok = tiny
    row = _row("u1", 3)
    row["candidates"] = ["i1", "nope", "i2"]
    with pytest.raises(PipelineError, match="'nope' has no title"):
        rank_rows(model, tok, make_style(tok, LETTERS), [row], ITEMS, progress=False)


def test_llama_architecture_smollm2_numbers_equal_teacher_forcing():
    model, tok = load_model_and_tokenizer(SMOLLM2, cache_dir=CACHE_DIR)
    style = make_style(tok, NUMBERS)
    lt = label_tokens(tok, style).for_k(12)  # "1" + terminator, "10".."12" two tokens
    prompts = [encode(tok, build_prompt(titles(n, "h "), titles(12, "c "), tok, style)) for n in (0, 2)]
    got = score_prompts(model, prompts, lt, batch_size=2, pad_id=tok.pad_token_id, progress=False)
    # Teacher-forced reference for "1" + terminator, "2", "10", "12"; the shorter prompt is
    # left-padded in the batch.
    for p, g in zip(prompts, got):
        want = _teacher_forced(model, p, [lt.scored_ids[i] for i in (0, 1, 9, 11)])
        _close([g[i] for i in (0, 1, 9, 11)], want, 2e-4)
    assert max(got[0]) - min(got[0]) > 0.5  # a pretrained model has opinions
