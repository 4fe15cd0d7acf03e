"""reranker.candidate_attention isolated: the readout's forward shows each candidate line apart
(`rerank.model.readout.isolated_attention`), so a line's score depends on the prefix and itself only."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import PipelineError
from rerank.inference.ranker import score_prompts
from rerank.model.readout import READOUT_MODULE, isolated_attention, padded_ends, readout_scores
from rerank.prompting.labels import LETTERS, NUMBERS
from rerank.prompting.prompts import LineSpans, encode_prompt_ends, label_tokens
from rerank.prompting.style import CANDIDATE_FORMATS, PromptStyle, make_style
from tests.helpers.tokenizers import TOKENIZERS, titles
from tests.helpers.training import tok
from tests.rerank.model.test_readout import _readout_model


def _isolated(t, **settings):
    return make_style(t, settings.pop("scheme", LETTERS), candidate_attention="isolated", **settings)


@pytest.mark.parametrize("tok_name", ["qwen", "smollm2"])
@pytest.mark.parametrize("position", list(CANDIDATE_FORMATS))
@pytest.mark.parametrize("scheme", [LETTERS, NUMBERS])
def test_line_spans_hold_exactly_each_candidate_line(tok_name, position, scheme):
    t = TOKENIZERS[tok_name]()
    style = _isolated(t, scheme=scheme, candidate_format=CANDIDATE_FORMATS[position])
    history, cands = titles(4, "h "), [*titles(6, "c "), "Alien.", "Heat (1995)!"]
    ids, spans = encode_prompt_ends(history, cands, t, style)
    causal_ids, ends = encode_prompt_ends(history, cands, t, dataclasses.replace(style, candidate_attention="causal"))
    assert isinstance(spans, LineSpans) and isinstance(ends, list)
    assert ids == causal_ids and spans.ends == ends  # the same prompt, the same ends: only the spans are added
    for j, (a, b) in enumerate(zip(spans.starts, spans.ends)):
        line = CANDIDATE_FORMATS[position].format(label=scheme.labels[j], title=cands[j])
        assert t.decode(ids[a : b + 1]).strip("\n") == line
        assert j == 0 or a > spans.ends[j - 1]
    assert "Candidate pool:" in t.decode(ids[: spans.starts[0]])  # the header is prefix, not line 1


def test_the_isolated_mask_and_positions_on_a_hand_built_batch():
    # columns: 0 pad | 1, 2 prefix | 3, 4 line 1 | 5 a token between lines | 6 line 2 | 7 after the lines
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1]])
    allowed, positions = isolated_attention(mask, torch.tensor([[3, 6]]), torch.tensor([[4, 6]]))
    assert positions.tolist() == [[0, 0, 1, 2, 3, 4, 2, 4]]  # both lines start at 2; after: 2 + longest line (2)
    sees = {
        0: [0],  # padding: itself only (no empty softmax row)
        1: [1], 2: [1, 2],
        3: [1, 2, 3], 4: [1, 2, 3, 4],  # line 1: prefix + itself
        5: [1, 2, 5],  # between lines: seen by no line, sees the prefix
        6: [1, 2, 6],  # line 2: prefix + itself, never line 1
        7: [1, 2, 3, 4, 5, 6, 7],  # after the lines: every real token before it
    }
    assert allowed.shape == (1, 1, 8, 8)
    assert {i: [j for j in range(8) if allowed[0, 0, i, j]] for i in range(8)} == sees


def _prompts(style, orders):
    return [encode_prompt_ends(titles(n, "h "), cands, tok(), style) for n, cands in orders]


def test_isolated_readout_scores_equal_a_forward_over_prefix_and_own_line():
    """Batched and left-padded, each candidate's isolated score equals the unit on the last state of
    a plain causal forward over the prompt's prefix followed by that candidate's line alone."""
    model = _readout_model()
    style = _isolated(tok(), max_history=4)
    prompts = _prompts(style, [(n, titles(5, f"c{n} ")) for n in (1, 4, 2)])
    fast = score_prompts(model, [p for p, _ in prompts], label_tokens(tok(), style).for_k(5), batch_size=3,
                         pad_id=tok().pad_token_id, progress=False, ends=[s for _, s in prompts])
    unit = getattr(model, READOUT_MODULE)
    with torch.no_grad():
        for (ids, spans), got in zip(prompts, fast):
            slow = []
            for a, b in zip(spans.starts, spans.ends):
                x = ids[: spans.starts[0]] + ids[a : b + 1]
                slow.append(unit(model.get_decoder()(input_ids=torch.tensor([x])).last_hidden_state[0, -1].float()).item())
            assert got == pytest.approx(slow, abs=1e-4)
    assert len({round(x, 4) for x in fast[0]}) > 1


@pytest.mark.parametrize("attention", ["causal", "isolated"])
def test_a_candidates_isolated_score_ignores_the_other_candidates(attention):
    """Slots 1 and 5 hold the same candidates in both prompts; the others change title and order.
    Isolated: their scores stay; causal: slot 5 reads the changed lines above it."""
    model = _readout_model()
    style = make_style(tok(), LETTERS, max_history=4, candidate_attention=attention)
    c = titles(6, "c ")
    prompts = _prompts(style, [(3, c[:5]), (3, [c[0], c[5], c[3], c[2], c[4]])])
    a, b = score_prompts(model, [p for p, _ in prompts], label_tokens(tok(), style).for_k(5), batch_size=2,
                         pad_id=tok().pad_token_id, progress=False, ends=[s for _, s in prompts])
    assert a[0] == pytest.approx(b[0], abs=1e-5)  # nothing above slot 1 changed, in either mode
    if attention == "isolated":
        assert a[4] == pytest.approx(b[4], abs=1e-5)
    else:
        assert a[4] != pytest.approx(b[4], abs=1e-3)


def test_a_batch_mixing_isolated_and_causal_lines_is_refused():
    iso = encode_prompt_ends(titles(2, "h "), titles(3, "c "), tok(), _isolated(tok()))
    causal = encode_prompt_ends(titles(2, "h "), titles(3, "c "), tok(), make_style(tok(), LETTERS))
    with pytest.raises(PipelineError, match="mixes isolated and causal"):
        padded_ends([iso[1], causal[1]], [len(iso[0]), len(causal[0])], max(len(iso[0]), len(causal[0])), torch.device("cpu"))


def test_isolation_is_trained_through_the_ranker_scores_and_saved_with_the_style(tmp_path):
    with pytest.raises(PipelineError, match="candidate_attention isolated"):
        load_config(None, ["reranker.candidate_attention=isolated"])  # loss vocab reads the training text's own forward
    with pytest.raises(PipelineError, match="candidate_attention isolated"):
        load_config(None, ["reranker.candidate_attention=isolated", "reranker.loss=labels", "reranker.vocab_loss_weight=0.5"])
    for head in ("readout", "label_tokens"):
        cfg = load_config(None, [f"reranker.head={head}", "reranker.loss=labels", "reranker.candidate_attention=isolated"])
        assert cfg.reranker.candidate_attention == "isolated"
    style = _isolated(tok())
    style.save(tmp_path)
    assert PromptStyle.load(tmp_path).candidate_attention == "isolated"  # inference shows the lines as trained
    with pytest.raises(PipelineError, match="candidate_attention"):
        dataclasses.replace(style, candidate_attention="sparse")


def test_eager_and_sdpa_kernels_give_the_same_isolated_scores_and_flash_is_refused(monkeypatch):
    model = _readout_model()
    ids, spans = encode_prompt_ends(titles(2, "h "), titles(3, "c "), tok(), _isolated(tok()))
    args = (torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), padded_ends([spans], [len(ids)], len(ids), torch.device("cpu")))
    scores = {}
    with torch.no_grad():
        for impl in ("sdpa", "eager"):  # a boolean mask for SDPA, an additive one for eager
            model.set_attn_implementation(impl)
            assert model.config._attn_implementation == impl
            scores[impl] = readout_scores(model, *args)
    assert torch.allclose(scores["sdpa"], scores["eager"], atol=1e-4)
    monkeypatch.setattr(model.config, "_attn_implementation", "flash_attention_2", raising=False)
    with pytest.raises(PipelineError, match="flash_attention_2"):
        readout_scores(model, *args)


def _label_model():
    from rerank.model.adapter import add_lora
    from tests.helpers.training import cfg, fresh_model

    model = add_lora(fresh_model(), cfg(loss="labels", lora_target_modules="all-linear"), seed=0)
    with torch.no_grad():  # LoRA B starts at zero: make the adapter do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    return model.eval()


def _permute_lines(ids, spans, order):
    """The prompt with its candidate lines (each with its own label) in `order`: isolated lines sit
    at the same positions wherever they are, so only the columns move."""
    assert all(spans.starts[j + 1] == spans.ends[j] + 1 for j in range(len(order) - 1))  # no tokens between lines
    head, tail = ids[: spans.starts[0]], ids[spans.ends[-1] + 1 :]
    chunks = [ids[a : b + 1] for a, b in zip(spans.starts, spans.ends)]
    out, starts, ends = list(head), [], []
    for j in order:
        starts.append(len(out))
        out += chunks[j]
        ends.append(len(out) - 1)
    return out + list(tail), LineSpans(starts, ends)


@pytest.mark.parametrize("scheme", [LETTERS, NUMBERS])
@pytest.mark.parametrize("attention", ["causal", "isolated"])
def test_a_label_head_on_isolated_lines_reads_them_as_a_set(scheme, attention):
    """Moving whole lines (title AND label) leaves every label's score unchanged when the lines are
    isolated: the answer position sees the same lines at the same positions. Numbers (two-token
    labels from 10) check the continuation's positions too. Causal lines change."""
    model = _label_model()
    style = make_style(tok(), scheme, max_history=3, candidate_format=CANDIDATE_FORMATS["after"], candidate_attention="isolated")
    k = 12 if scheme is NUMBERS else 6
    ids, spans = encode_prompt_ends(titles(3, "h "), titles(k, "c "), tok(), style)
    order = list(reversed(range(k)))
    moved, moved_spans = _permute_lines(ids, spans, order)
    lt = label_tokens(tok(), style).for_k(k)
    ends = None if attention == "causal" else [spans, moved_spans]
    a, b = score_prompts(model, [ids, moved], lt, batch_size=2, pad_id=tok().pad_token_id, progress=False, ends=ends)
    if attention == "isolated":
        assert a == pytest.approx(b, abs=1e-4)
    else:
        assert a != pytest.approx(b, abs=1e-3)
    assert len({round(x, 3) for x in a}) > 1


def test_the_labels_loss_on_isolated_lines_is_the_cross_entropy_of_the_ranker_scores(tmp_path):
    import torch.nn.functional as F

    from rerank.inference.ranker import rank_rows
    from tests.helpers.training import labels_trainer, samples_batch_and_rows

    style = make_style(tok(), LETTERS, max_history=3, candidate_attention="isolated")
    batch, rows, titles_by = samples_batch_and_rows(style)
    assert batch["candidate_ends"].dim() == 3
    model = _label_model()
    with torch.no_grad():
        ranked = torch.tensor(rank_rows(model, tok(), style, rows, titles_by, batch_size=2, progress=False))
        causal = torch.tensor(rank_rows(model, tok(), dataclasses.replace(style, candidate_attention="causal"), rows, titles_by, progress=False))
    assert not torch.allclose(ranked, causal, atol=1e-3)  # the ranker did show the lines isolated
    trainer = labels_trainer(tmp_path, model, label_tokens(tok(), style).for_k(6))
    want = F.cross_entropy(ranked, batch["target_index"]).item()  # ranked: log-probabilities, the same softmax over K
    assert trainer.compute_loss(model, batch).item() == pytest.approx(want, rel=1e-4)


def test_isolated_lines_are_refused_where_the_prompt_is_shown_as_written():
    from rerank.inference.ranker import encode_rows
    from serving.engine import RerankEngine
    from serving.vllm_backend import VLLMScorer

    style = _isolated(tok())
    rows = [{"user": "1", "history": ["a"], "candidates": ["a", "b"], "target": "a"}]
    with pytest.raises(PipelineError, match="isolated"):  # e.g. the generation baseline's prompts
        encode_rows(tok(), style, rows, {"a": "A film", "b": "B film"}, with_ends=False, progress=False)
    with pytest.raises(PipelineError, match="isolated"):
        RerankEngine(VLLMScorer.__new__(VLLMScorer), tok(), style, {"a": "A film"}, {}, "x", {})
