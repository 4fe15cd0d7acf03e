"""The label-free readout head (`rerank.model.readout`): positions, scores, loss, save/load."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import load_config
from pipeline.errors import PipelineError
from rerank.inference.ranker import rank_rows, score_prompts
from rerank.model.adapter import add_lora, load_adapter, save_adapter
from rerank.model.readout import READOUT_MODULE, adapter_has_readout, has_readout, readout_scores
from rerank.prompting.labels import LETTERS, NUMBERS
from rerank.prompting.prompts import encode_prompt, encode_prompt_ends, label_tokens
from rerank.prompting.style import CANDIDATE_FORMATS, make_style
from rerank.training.collate import TrainingTexts, collator_for
from rerank.training.samples import build_samples
from tests.helpers.data import make_ds
from tests.helpers.tokenizers import TOKENIZERS, titles
from tests.helpers.training import cfg, fresh_model, labels_trainer, samples_batch_and_rows, tok, val_rows


@pytest.mark.parametrize("tok_name", ["qwen", "smollm2"])
@pytest.mark.parametrize("position", list(CANDIDATE_FORMATS))
@pytest.mark.parametrize("scheme", [LETTERS, NUMBERS])
def test_candidate_ends_are_the_last_token_of_each_line(tok_name, position, scheme):
    t = TOKENIZERS[tok_name]()
    style = make_style(t, scheme, candidate_format=CANDIDATE_FORMATS[position])
    history = titles(5, "h ")
    cands = [*titles(11, "c "), "Alien.", "Heat (1995)!", "Ends in a digit 7"]
    ids, ends = encode_prompt_ends(history, cands, t, style)
    assert ids == encode_prompt(history, cands, t, style)
    assert ends == sorted(ends) and len(set(ends)) == len(cands)
    for j, e in enumerate(ends):
        label = scheme.labels[j]
        line = CANDIDATE_FORMATS[position].format(label=label, title=cands[j])
        upto = t.decode(ids[: e + 1])
        # the text up to this token ends with the whole line (and at most its newlines), the token before does not
        assert upto.rstrip("\n").endswith(line), (upto[-60:], line)
        assert not t.decode(ids[:e]).rstrip("\n").endswith(line)


def _flat(rows):
    return [x for row in rows for x in row]


def _readout_model(seed: int = 0):
    model = add_lora(fresh_model(), cfg(head="readout", loss="labels", lora_target_modules="all-linear"), seed=seed)
    with torch.no_grad():  # a non-trivial unit (it starts at zero)
        unit = getattr(model, READOUT_MODULE)
        for p in unit.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    return model.eval()


def test_readout_scores_equal_a_slow_per_candidate_reference():
    """The batched one-pass readout (left padding, prompts of different lengths) equals, for every
    candidate, the unit applied to the last hidden state of a forward over the prompt cut right after
    that candidate's line (causal: nothing later can change it)."""
    model = _readout_model()
    style = make_style(tok(), LETTERS, max_history=4)
    prompts = [encode_prompt_ends(titles(n, "h "), titles(5, f"c{n} "), tok(), style) for n in (1, 4, 2)]
    fast = score_prompts(model, [p for p, _ in prompts], label_tokens(tok(), style).for_k(5), batch_size=3, pad_id=tok().pad_token_id,
                         progress=False, ends=[e for _, e in prompts])
    unit = getattr(model, READOUT_MODULE)
    with torch.no_grad():
        for (ids, ends), got in zip(prompts, fast):
            slow = []
            for e in ends:
                h = model.get_decoder()(input_ids=torch.tensor([ids[: e + 1]])).last_hidden_state[0, -1]
                slow.append(unit(h.float()).item())
            assert got == pytest.approx(slow, abs=1e-4)
    assert len({round(x, 4) for x in fast[0]}) > 1  # candidates get different scores


@pytest.mark.parametrize("attention", ["causal", "isolated"])
def test_readout_loss_is_the_cross_entropy_of_its_scores(tmp_path, attention):
    style = make_style(tok(), LETTERS, max_history=3, candidate_attention=attention)
    batch, rows, titles_by = samples_batch_and_rows(style)
    assert batch["candidate_ends"].dim() == (3 if attention == "isolated" else 2)  # isolated: first and last tokens
    model = _readout_model()
    with torch.no_grad():
        ranked = torch.tensor(rank_rows(model, tok(), style, rows, titles_by, batch_size=2, progress=False))
        trained = readout_scores(model, batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["candidate_ends"])
    assert torch.allclose(trained, ranked, atol=1e-4)  # training reads the same scores the ranker ranks by
    want = F.cross_entropy(ranked, batch["target_index"]).item()
    trainer = labels_trainer(tmp_path, model, label_tokens(tok(), style).for_k(6))
    trainer.head = "readout"  # what train_reranker passes for reranker.head readout
    assert trainer.compute_loss(model, batch).item() == pytest.approx(want, rel=1e-4)
    trainer.head = "label_tokens"  # the same batch through the label head: another loss
    assert trainer.compute_loss(model, batch).item() != pytest.approx(want, rel=1e-4)


def test_a_readout_adapter_saves_and_loads_with_its_unit(tmp_path):
    model = _readout_model()
    style = make_style(tok(), LETTERS, max_history=3)
    save_adapter(model, style, tmp_path / "adapter")
    assert adapter_has_readout(tmp_path / "adapter")
    ds = make_ds()
    rows = val_rows(ds)
    titles_by = dict(zip(ds.item_ids[1:], ds.titles[1:]))
    loaded = load_adapter(fresh_model(), tmp_path / "adapter")
    assert has_readout(loaded) and not has_readout(fresh_model())
    with torch.no_grad():
        a = rank_rows(model, tok(), style, rows, titles_by, progress=False)
        b = rank_rows(loaded, tok(), style, rows, titles_by, progress=False)
    assert a == b and len({round(x, 5) for x in a[0]}) > 1


def test_the_readout_head_is_trained_with_the_k_way_loss():
    with pytest.raises(PipelineError, match="readout"):
        load_config(None, ["reranker.head=readout", "reranker.loss=vocab"])
    with pytest.raises(PipelineError, match="readout"):
        load_config(None, ["reranker.head=readout", "reranker.loss=labels", "reranker.pretrain_steps=5"])
    assert load_config(None).reranker.head == "label_tokens"


@pytest.mark.parametrize("attention", ["causal", "isolated"])
def test_a_readout_run_exports_and_serves_its_unit(tmp_path, attention):
    """The merged export keeps the unit (readout.safetensors, attached again on load) and the HTTP
    engine scores a readout model from each candidate line's end: both equal the adapter's ranking
    (isolated lines too: the style carries how the lines are shown)."""
    from rerank.export import save_merged
    from rerank.model.adapter import merge_lora
    from rerank.model.readout import READOUT_FILE
    from rerank.model.sources import load_model_and_tokenizer
    from serving.engine import RerankEngine
    from serving.schema import RerankRequest, TextItem
    from serving.scorer import LocalScorer

    model = _readout_model()
    style = make_style(tok(), LETTERS, max_history=3, candidate_attention=attention)
    ds = make_ds()
    rows = val_rows(ds)[:3]
    titles_by = dict(zip(ds.item_ids[1:], ds.titles[1:]))
    with torch.no_grad():
        want = rank_rows(model, tok(), style, rows, titles_by, progress=False)

    engine = RerankEngine(LocalScorer(model, tok().pad_token_id, 4), tok(), style, titles_by, {}, "x", {})
    prepared = [engine.prepare(RerankRequest(query=r["history"], documents=[TextItem(text=titles_by[c]) for c in r["candidates"]]))
                for r in rows]
    assert all(p.ends is not None for p in prepared) and engine.info["head"] == "readout"
    assert _flat(engine.score(prepared)) == pytest.approx(_flat(want), abs=1e-5)

    merged = merge_lora(model)
    assert has_readout(merged)
    out = tmp_path / "merged"
    out.mkdir()
    save_merged(merged, out)  # what export_merged writes the weights with
    tok().save_pretrained(out)
    loaded, loaded_tok = load_model_and_tokenizer(str(out))
    assert has_readout(loaded) and (out / READOUT_FILE).is_file()
    with torch.no_grad():
        got = rank_rows(loaded, loaded_tok, style, rows, titles_by, progress=False)
    assert _flat(got) == pytest.approx(_flat(want), abs=1e-4)


def test_a_readout_run_end_to_end_and_ranked_again_from_its_adapter(smoke_run, tmp_path):
    """train_reranker.py with reranker.head=readout on the smoke candidates: trains, ranks, calibrates
    and fuses like a label run (metrics.json sections, rankings rows), saves the unit in its adapter;
    rank_reranker.py ranks from that adapter to the same LLM scores."""
    import json

    from pipeline.candidates import read_rows
    from tests.helpers.scripts import ONE_THREAD, run_script

    out = tmp_path / "readout"
    proc = run_script(
        "scripts/train_reranker.py", "--config", "configs/experiments/smoke.yaml", "--out", str(out),
        "--set", f"retriever_run={smoke_run[0]}", "--set", "reranker.head=readout", "--set", "reranker.loss=labels",
        env=ONE_THREAD,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert adapter_has_readout(out / "adapter")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"subset", "overall", "retriever_subset", "fusion", "calibration"} <= set(metrics["test"])
    rows = read_rows(out / "rankings_test.jsonl")
    assert rows and all(len(r["llm_scores"]) == len(r["candidates"]) for r in rows)
    assert json.loads((out / "train_summary.json").read_text())["head"] == "readout"
    again = tmp_path / "again"
    proc = run_script("scripts/rank_reranker.py", "--run", str(out), "--out", str(again), env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["llm_scores"] for r in read_rows(again / "rankings_test.jsonl")] == [r["llm_scores"] for r in rows]


def _aux_setup():
    """4 training prompts of 6 candidates, their batch, and a LoRA model with an auxiliary unit."""
    from rerank.model.readout import AUX_MODULE, attach_readout

    ds = make_ds()
    samples = build_samples(ds, n_candidates=6, seed=0, max_samples=4)
    style = make_style(tok(), LETTERS, max_history=3)
    texts = TrainingTexts(samples, ds.titles, tok(), style, readout=True)
    batch = collator_for(tok())([texts[i] for i in range(4)])
    model = add_lora(fresh_model(), cfg(loss="labels", lora_target_modules="all-linear"), seed=0).eval()
    attach_readout(model.get_base_model(), name=AUX_MODULE)
    return ds, samples, style, batch, model


def test_the_auxiliary_readout_trains_beside_a_label_head_and_leaves_no_trace(tmp_path):
    """reranker.readout_aux_weight: the loss is the label loss + w x the auxiliary unit's readout loss;
    after training the unit is gone, the adapter holds no readout, and the run ranks by its labels."""
    from rerank.model.readout import AUX_MODULE
    from rerank.training.stages import train_reranker

    ds, samples, style, batch, model = _aux_setup()
    with torch.no_grad():
        for p in getattr(model, AUX_MODULE).parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        trainer = labels_trainer(tmp_path, model, label_tokens(tok(), style).for_k(6))
        labels_only = trainer.compute_loss(model, batch).item()
        aux = F.cross_entropy(readout_scores(model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                             batch["candidate_ends"], name=AUX_MODULE), batch["target_index"]).item()
        trainer.readout_aux_weight = 0.5
        assert trainer.compute_loss(model, batch).item() == pytest.approx(labels_only + 0.5 * aux, rel=1e-5)

    trained = fresh_model()
    summary = train_reranker(trained, tok(), style, ds, samples, [], cfg(loss="labels", readout_aux_weight=1.0, num_epochs=2),
                             tmp_path / "run", seed=0)
    assert summary["global_step"] == 2
    assert not hasattr(trained, AUX_MODULE) and not has_readout(trained)
    assert not adapter_has_readout(tmp_path / "run" / "adapter")
    with pytest.raises(PipelineError, match="readout_aux_weight"):
        load_config(None, ["reranker.readout_aux_weight=1", "reranker.head=readout", "reranker.loss=labels"])


def test_each_loss_term_is_logged_apart_from_their_sum(tmp_path):
    """With the aux unit the logged "loss" is labels + w x aux; loss_labels and loss_aux are each term's
    mean per optimizer step since the last log (unweighted), so a log shows which of them fits.
    A loss of one term logs no extra keys."""
    from rerank.model.readout import AUX_MODULE

    ds, samples, style, batch, model = _aux_setup()
    trainer = labels_trainer(tmp_path, model, label_tokens(tok(), style).for_k(6))
    trainer.readout_aux_weight = 0.5
    with torch.no_grad():
        labels_only = labels_trainer(tmp_path, model, label_tokens(tok(), style).for_k(6)).compute_loss(model, batch).item()
        aux = F.cross_entropy(readout_scores(model, batch["prompt_input_ids"], batch["prompt_attention_mask"],
                                             batch["candidate_ends"], name=AUX_MODULE), batch["target_index"]).item()
        model.training = True  # the top module only: its LoRA dropout stays off, so the terms are exact
        for _ in range(2):  # two optimizer steps of one micro-batch each
            trainer.compute_loss(model, batch)
        trainer.state.global_step = 2
        trainer.log({"loss": 1.0})
        logged = trainer.state.log_history[-1]
        assert logged["loss_labels"] == pytest.approx(labels_only, rel=1e-5)
        assert logged["loss_aux"] == pytest.approx(aux, rel=1e-5)
        trainer.readout_aux_weight = 0.0
        trainer.compute_loss(model, batch)
        trainer.state.global_step = 3
        trainer.log({"loss": 1.0})
        assert not any(k.startswith("loss_") for k in trainer.state.log_history[-1])


def test_a_middle_layer_is_that_layers_output_through_the_final_norm():
    """line_end_hidden(layer=l): the state a model cut after its l-th layer would end with (its own
    final norm), at every candidate line's end, with left padding; the last layer = the default."""
    import copy

    from rerank.model.readout import line_end_hidden, padded_ends

    model = _readout_model()
    style = make_style(tok(), LETTERS, max_history=4)
    prompts = [encode_prompt_ends(titles(n, "h "), titles(4, f"c{n} "), tok(), style) for n in (1, 3)]
    width = max(len(ids) for ids, _ in prompts)
    pad = tok().pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in prompts])
    ends = padded_ends([e for _, e in prompts], [len(p) for p, _ in prompts], width, ids.device)
    cut = copy.deepcopy(model)
    cut.get_decoder().layers = cut.get_decoder().layers[:1]
    n_layers = len(model.get_decoder().layers)
    with torch.no_grad():
        middle = line_end_hidden(model, ids, mask, ends, layer=1)
        want = line_end_hidden(cut, ids, mask, ends)
        assert torch.allclose(middle, want, atol=1e-5)
        assert torch.equal(line_end_hidden(model, ids, mask, ends, layer=n_layers), line_end_hidden(model, ids, mask, ends))
        assert not torch.allclose(middle, line_end_hidden(model, ids, mask, ends), atol=1e-3)
    with pytest.raises(PipelineError, match="outside the model's layers"):
        line_end_hidden(model, ids, mask, ends, layer=n_layers + 1)


def test_the_auxiliary_unit_reads_its_layer_and_needs_lora_there(tmp_path):
    """reranker.readout_aux_layer: the aux loss term reads that layer; a layer no LoRA layer reaches,
    one beyond the model, or one without the aux weight stop at start with the fix."""
    from rerank.model.readout import AUX_MODULE
    from rerank.training.stages import train_reranker

    ds, samples, style, batch, model = _aux_setup()
    args = (batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["candidate_ends"])
    with torch.no_grad():
        for p in getattr(model, AUX_MODULE).parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        trainer = labels_trainer(tmp_path, model, label_tokens(tok(), style).for_k(6))
        trainer.readout_aux_weight = 0.0
        labels_only = trainer.compute_loss(model, batch).item()
        trainer.readout_aux_weight, trainer.readout_aux_layer = 1.0, 1
        aux = F.cross_entropy(readout_scores(model, *args, name=AUX_MODULE, layer=1), batch["target_index"]).item()
        last = F.cross_entropy(readout_scores(model, *args, name=AUX_MODULE), batch["target_index"]).item()
        assert aux != pytest.approx(last, rel=1e-4)
        assert trainer.compute_loss(model, batch).item() == pytest.approx(labels_only + aux, rel=1e-5)

    def train(**kw):
        return train_reranker(fresh_model(), tok(), style, ds, samples, [], cfg(loss="labels", readout_aux_weight=1.0, **kw),
                              tmp_path / f"run{len(kw)}{kw.get('lora_layers')}{kw.get('readout_aux_layer')}", seed=0)

    with pytest.raises(PipelineError, match=r"readout_aux_layer 1 reads states below every LoRA layer .*lora_layers >= 2"):
        train(readout_aux_layer=1, lora_layers=1)
    with pytest.raises(PipelineError, match="beyond the model's 2 layers"):
        train(readout_aux_layer=3)
    assert train(readout_aux_layer=1, lora_layers=2)["global_step"] == 1
    with pytest.raises(PipelineError, match="set reranker.readout_aux_weight > 0 with it"):
        load_config(None, ["reranker.readout_aux_layer=2"])
