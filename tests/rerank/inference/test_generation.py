"""Generation-based ranking (`rerank.inference.generation`, scripts/generation_baseline.py): the answer parser on
hand-written strings, scores that reproduce the parsed order, real `generate` on the tiny model
(forced to known answers by a forward hook, so the accounting is tested, not the random model), and
the script on the smoke run."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch

from pipeline.errors import PipelineError
from pipeline.metrics import candidate_rank
from rerank.inference.generation import (
    LIST_SEPARATOR,
    accounting,
    default_max_new_tokens,
    generate_rankings,
    list_style,
    order_scores,
    parse_labels,
)
from rerank.inference.ranker import rank_rows
from rerank.model.sources import load_model_and_tokenizer
from rerank.model.standins import TINY_QWEN2
from rerank.prompting.labels import LETTERS, NUMBERS, encode, get_scheme
from rerank.prompting.prompts import build_prompt, label_tokens
from rerank.prompting.style import make_style
from tests.helpers.scripts import run_script
from tests.helpers.tokenizers import CACHE_DIR, TITLES

L5 = LETTERS.for_k(5)
N12 = NUMBERS.for_k(12)


# ----------------------------------------------------------------------------------------
# Parser


def test_parse_letters_with_every_separator_and_bracket():
    p = parse_labels("(C), A > B\nE;D", L5)
    assert p.labels == ("C", "A", "B", "E", "D") and p.invalid == () and p.n_duplicates == 0
    p = parse_labels("**B**. [A] 'E' -> D", L5)
    assert p.labels == ("B", "A", "E", "D") and p.invalid == ()


def test_parse_numbers_are_whole_pieces():
    p = parse_labels("12, 1, 10, 2", N12)
    assert p.labels == ("12", "1", "10", "2") and p.invalid == ()
    p = parse_labels("1. 110 13 0 12", N12)  # 110, 13 (beyond K) and 0 are no labels in use
    assert p.labels == ("1", "12") and p.invalid == ("110", "13", "0")
    assert parse_labels("10", N12).labels == ("10",)  # never read as "1" + "0"


def test_parse_counts_invalid_pieces_and_duplicates():
    p = parse_labels("The answer is: B, b, F, B, A, A", L5)  # F is beyond K=5, b is not a label
    assert p.labels == ("B", "A")
    assert p.invalid == ("The", "answer", "is:", "b", "F")
    assert p.n_duplicates == 2
    assert parse_labels("(A) Toy Story (1995)", L5).invalid == ("Toy", "Story", "(1995)")


def test_parse_empty_punctuation_and_truncated_answers():
    for text in ("", "   \n", " - ... , ()"):
        p = parse_labels(text, L5)
        assert p.labels == () and p.invalid == () and p.n_duplicates == 0
    p = parse_labels("D, A, E, ", L5)  # cut by the token budget
    assert p.labels == ("D", "A", "E") and p.invalid == ()


def test_parse_custom_labels_and_refuses_labels_with_separators():
    scheme = get_scheme("custom", ["a1", "b-2", "c.3"])
    assert parse_labels("c.3 > (b-2), a1.", scheme.labels).labels == ("c.3", "b-2", "a1")
    with pytest.raises(PipelineError, match="separator"):
        parse_labels("x", ["item one", "item two"])


def test_scores_give_the_parsed_order_then_the_retriever_order():
    cands = ["i1", "i2", "i3", "i4", "i5"]
    scores = order_scores(["D", "B"], L5)
    ranks = {c: candidate_rank(scores, cands, c) for c in cands}
    assert ranks == {"i4": 1, "i2": 2, "i1": 3, "i3": 4, "i5": 5}
    assert [candidate_rank(order_scores([], L5), cands, c) for c in cands] == [1, 2, 3, 4, 5]
    with pytest.raises(PipelineError, match="not among"):
        order_scores(["F"], L5)


# ----------------------------------------------------------------------------------------
# Prompts and budgets


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer(TINY_QWEN2, cache_dir=CACHE_DIR)


def test_list_style_changes_only_the_answer_instruction(tiny):
    _, tok = tiny
    style = make_style(tok, LETTERS)
    hist, cands = TITLES[:3], TITLES[3:8]
    a = build_prompt(hist, cands, tok, style).splitlines()
    b = build_prompt(hist, cands, tok, list_style(style)).splitlines()
    diff = [(x, y) for x, y in zip(a, b) if x != y]  # the instruction line (it ends the user turn)
    assert len(a) == len(b) and len(diff) == 1
    assert diff[0][0].startswith("Answer with only one letter (A-E).")
    assert diff[0][1].startswith("Rank all candidates from most to least likely: answer with every letter (A-E) once")
    assert list_style(make_style(tok, NUMBERS)).scheme.answer_instruction(12).count("number (1-12)") == 1


def test_default_token_budgets(tiny):
    _, tok = tiny
    lt = label_tokens(tok, make_style(tok, NUMBERS)).for_k(12)
    assert default_max_new_tokens(tok, lt, "greedy") == 3  # "10".."12" are two Qwen tokens, + end of turn
    expected = len(encode(tok, LIST_SEPARATOR.join(N12))) + 1
    assert default_max_new_tokens(tok, lt, "list") > expected
    with pytest.raises(PipelineError, match="generation mode"):
        default_max_new_tokens(tok, lt, "beam")


# ----------------------------------------------------------------------------------------
# generate on the tiny model


ITEMS = {str(i): t for i, t in enumerate(TITLES, start=1)}


def _rows(k: int) -> list[dict]:
    """Three users with different history lengths (so batches are left-padded), k candidates."""
    ids = list(ITEMS)
    return [
        {"user": f"u{n}", "history": ids[:n], "candidates": ids[-k:], "scores": [0.0] * k, "target": ids[-k:][n % k]}
        for n in (1, 3, 6)
    ]


@contextlib.contextmanager
def forced(model, tok, style, rows, answers: dict[str, str]):
    """The model writes `answers[user]` then its end-of-turn token, through the real generate loop:
    a forward hook masks every logit but the next forced token. Rows are told apart at the prompt
    pass by their unpadded prompt length."""
    terminator = label_tokens(tok, style).terminator_id
    by_length = {}
    for row in rows:
        prompt = build_prompt([ITEMS[i] for i in row["history"]], [ITEMS[i] for i in row["candidates"]], tok, style)
        by_length[len(encode(tok, prompt))] = encode(tok, answers[row["user"]]) + [terminator]
    assert len(by_length) == len(rows)
    state = {"step": 0, "script": []}

    def hook(module, args, kwargs, output):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")  # no mask when nothing is padded
        if ids.shape[1] > 1:  # the prompt pass of a new batch
            lengths = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
            state["step"], state["script"] = 0, [by_length[int(n)] for n in lengths]
        logits = output.logits
        logits[:, -1, :] = float("-inf")
        for r, script in enumerate(state["script"]):
            logits[r, -1, script[min(state["step"], len(script) - 1)]] = 0.0
        state["step"] += 1
        return output

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def test_forced_list_answers_are_parsed_and_accounted(tiny):
    model, tok = tiny
    style = make_style(tok, LETTERS)
    rows = _rows(5)
    answers = {"u1": "C, A, (B) Z, A", "u3": "E, D, C, B, A", "u6": "The best is D"}
    with forced(model, tok, list_style(style), rows, answers):
        gens = generate_rankings(model, tok, style, rows, ITEMS, "list", batch_size=3, progress=False)
    assert [g.user for g in gens] == ["u1", "u3", "u6"]
    g1, g3, g6 = gens
    assert g1.text == answers["u1"] and g1.labels_parsed == ["C", "A", "B"]
    assert g1.invalid == ["Z"] and g1.n_invalid == 1 and g1.n_duplicates == 1 and not g1.complete
    assert g3.labels_parsed == ["E", "D", "C", "B", "A"] and g3.complete and g3.n_invalid == 0
    assert g6.labels_parsed == ["D"] and g6.n_invalid == 3
    assert all(g.stopped for g in gens)
    assert g3.new_tokens == len(encode(tok, answers["u3"])) + 1  # the end-of-turn token counts
    # scores give the parsed order, then retriever order
    for row, g in zip(rows, gens):
        ranked = sorted(row["candidates"], key=lambda c: candidate_rank(g.scores, row["candidates"], c))
        named = [row["candidates"][L5.index(lab)] for lab in g.labels_parsed]
        assert ranked == named + [c for c in row["candidates"] if c not in named]
    acc = accounting(gens)
    assert acc["complete"] == pytest.approx(1 / 3) and acc["answered"] == 1.0
    assert acc["invalid_pieces"] == 4 and acc["users_with_invalid"] == 2 and acc["duplicate_labels"] == 1


def test_forced_greedy_places_only_the_first_label_and_budget_truncates(tiny):
    model, tok = tiny
    style = make_style(tok, NUMBERS)
    rows = _rows(12)
    answers = {"u1": "12", "u3": "1, 10", "u6": "11 12"}
    with forced(model, tok, style, rows, answers):
        gens = generate_rankings(model, tok, style, rows, ITEMS, "greedy", batch_size=2, max_new_tokens=8, progress=False)
    assert [g.labels_parsed for g in gens] == [["12"], ["1", "10"], ["11", "12"]]
    assert gens[1].scores == order_scores(["1"], N12)  # greedy: top-1 only, the rest retriever order
    assert gens[0].scores[11] == 12.0 and sum(gens[0].scores) == 12.0
    with forced(model, tok, list_style(style), rows, {"u1": "3, 2, 1", "u3": "12", "u6": "5, 6, 7, 8"}):
        cut = generate_rankings(model, tok, style, rows, ITEMS, "list", max_new_tokens=4, progress=False)
    assert [g.stopped for g in cut] == [False, True, False]
    assert [g.new_tokens for g in cut] == [4, 3, 4]  # Qwen: "3", ",", " ", "2" | "1", "2", end of turn
    assert cut[0].labels_parsed == ["3", "2"] and cut[2].labels_parsed == ["5", "6"]
    assert accounting(cut)["truncated"] == 2


def test_label_constrained_greedy_agrees_with_the_one_pass_ranker(tiny):
    """generate's first step reads the same distribution as the one-pass ranker (same prompt, same
    answer position, left-padded or not), and with that step restricted to the label tokens the
    greedy answer is the ranker's top-1."""
    model, tok = tiny
    style = make_style(tok, LETTERS)
    rows = _rows(5)
    lt = label_tokens(tok, style).for_k(5)
    allowed = torch.tensor([ids[0] for ids in lt.label_ids])
    first_step: dict[int, list[float]] = {}  # unpadded prompt length -> label log-probs at step 0
    state = {"step": 0}

    def hook(module, args, kwargs, output):
        ids, mask = kwargs["input_ids"], kwargs.get("attention_mask")
        logits = output.logits[:, -1, :]
        if ids.shape[1] > 1:
            state["step"] = 0
            lengths = mask.sum(1).tolist() if mask is not None else [ids.shape[1]] * ids.shape[0]
            logp = logits.float().log_softmax(-1)[:, allowed]
            first_step.update({int(n): row.tolist() for n, row in zip(lengths, logp)})
        keep = logits[:, allowed].clone() if state["step"] == 0 else None
        logits[:] = float("-inf")
        if keep is not None:
            logits[:, allowed] = keep
        else:
            logits[:, lt.terminator_id] = 0.0
        state["step"] += 1
        return output

    one_pass = rank_rows(model, tok, style, rows, ITEMS, batch_size=3, progress=False)
    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        gens = generate_rankings(model, tok, style, rows, ITEMS, "greedy", batch_size=3, progress=False)
    finally:
        handle.remove()
    for row, scores in zip(rows, one_pass):
        prompt = build_prompt([ITEMS[i] for i in row["history"]], [ITEMS[i] for i in row["candidates"]], tok, style)
        assert first_step[len(encode(tok, prompt))] == pytest.approx(scores, abs=1e-4)
    assert [g.labels_parsed for g in gens] == [[L5[max(range(5), key=s.__getitem__)]] for s in one_pass]


def test_real_generation_is_deterministic_and_batch_independent(tiny):
    model, tok = tiny
    style = make_style(tok, LETTERS)
    rows = _rows(5)
    a = generate_rankings(model, tok, style, rows, ITEMS, "list", batch_size=3, progress=False)
    b = generate_rankings(model, tok, style, rows, ITEMS, "list", batch_size=1, progress=False)
    assert [g.to_dict() for g in a] == [g.to_dict() for g in b]
    budget = default_max_new_tokens(tok, label_tokens(tok, list_style(style)).for_k(5), "list")
    for g, row in zip(a, rows):
        assert len(g.scores) == len(row["candidates"]) and 1 <= g.new_tokens <= budget
        assert g.stopped or g.new_tokens == budget
    assert generate_rankings(model, tok, style, [], ITEMS, "greedy", progress=False) == []
    with pytest.raises(PipelineError, match="batch size"):
        generate_rankings(model, tok, style, rows, ITEMS, "greedy", batch_size=0)


# ----------------------------------------------------------------------------------------
# The script


def test_script_on_the_smoke_run(smoke_run, tmp_path):
    run, _ = smoke_run
    out = tmp_path / "gen"
    proc = run_script("scripts/generation_baseline.py", "--run", str(run), "--out", str(out), "--set", "analysis.max_users=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "generation.json").read_text())
    assert res["n_users"] == 4 and res["split"] == "test" and set(res["generation"]) == {"greedy", "list"}
    assert res["one_pass"]["seconds"] > 0 and "NDCG@10" in res["one_pass"]["metrics"]
    for mode, sec in res["generation"].items():
        assert sec["n_users"] == 4 and sec["seconds_per_user"] == pytest.approx(sec["seconds"] / 4)
        assert sec["speed_ratio"] == pytest.approx(sec["seconds"] / res["one_pass"]["seconds"])
        assert {"answered", "complete", "invalid_pieces", "duplicate_labels", "truncated", "mean_new_tokens"} <= set(sec["accounting"])
        lines = (out / f"generations_{mode}.jsonl").read_text().splitlines()
        recs = [json.loads(line) for line in lines]
        assert len(recs) == 4 and all(r["mode"] == mode and "text" in r for r in recs)
        recall1 = sum(r["rank"] == 1 for r in recs) / 4
        assert sec["metrics"]["Recall@1"] == pytest.approx(recall1)
    assert (out / "config.yaml").is_file() and json.loads((out / "run.json").read_text())["end"]
    assert "One-pass ranker" in (out / "generation.md").read_text()
    # a config for other data than the run's is refused with a one-line error
    bad = run_script("scripts/generation_baseline.py", "--run", str(run), "--out", str(tmp_path / "bad"),
                     "--config", "configs/experiments/generation_baseline.yaml")
    assert bad.returncode == 2 and "sets data.max_users = None but run" in bad.stderr
