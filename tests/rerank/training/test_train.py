"""LoRA training (`rerank.training.trainer`) with tiny-qwen2: the answer-only loss, training, saving and
loading the adapter, early stopping on validation NDCG@10, resuming, determinism."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import TrainingArguments

from pipeline.config import RerankerConfig
from pipeline.errors import PipelineError
from rerank.model.adapter import load_adapter
from rerank.prompting.labels import LETTERS, NUMBERS
from rerank.prompting.style import PromptStyle, make_style
from rerank.training.collate import IGNORE_INDEX, TrainingTexts, collator_for
from rerank.training.loss import supervised_logits
from rerank.training.samples import build_samples
from rerank.training.stages import train_reranker
from rerank.training.rerank_trainer import RerankTrainer
from rerank.training.validation import ranking_metrics, select_val_rows
from tests.helpers.data import make_ds
from tests.helpers.training import cfg, fresh_model, tok, val_rows


def batch_of(scheme, samples, ds):
    style = make_style(tok(), scheme, max_history=3)
    return collator_for(tok())([TrainingTexts(samples, ds.titles, tok(), style)[i] for i in range(len(samples))])


def answer_loss(model, batch) -> float:
    model.eval()
    with torch.no_grad():
        logits, targets = supervised_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return F.cross_entropy(logits.float(), targets).item()


def lora_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", [LETTERS, NUMBERS])
def test_restricted_loss_equals_the_full_vocabulary_loss(scheme, tmp_path):
    ds = make_ds()
    samples = build_samples(ds, n_candidates=12, seed=0, max_samples=3)  # padded batch; "10".."12" are 2 tokens
    batch = batch_of(scheme, samples, ds)
    assert batch["attention_mask"].eq(0).any()  # left padding present
    model = fresh_model().eval()
    with torch.no_grad():
        logits, targets = supervised_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        stock = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    shifted = batch["labels"][:, 1:]
    n = int(shifted.ne(IGNORE_INDEX).sum())
    assert logits.shape == (n, model.config.vocab_size)  # only the supervised positions were projected
    full = stock.logits[:, :-1].float()
    manual = F.cross_entropy(full.reshape(-1, full.shape[-1]), shifted.reshape(-1), ignore_index=IGNORE_INDEX)
    ours = F.cross_entropy(logits.float(), targets)
    assert torch.allclose(ours, stock.loss, atol=1e-5) and torch.allclose(ours, manual, atol=1e-5)
    assert torch.allclose(logits, full[shifted.ne(IGNORE_INDEX)], atol=1e-4)
    assert targets.tolist() == shifted[shifted.ne(IGNORE_INDEX)].tolist()

    # The Trainer's compute_loss: the token mean, or the sum over num_items_in_batch (grad accumulation).
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    trainer = RerankTrainer(model=model, args=args, data_collator=collator_for(tok()))
    with torch.no_grad():
        assert torch.allclose(trainer.compute_loss(model, batch), ours, atol=1e-6)
        assert torch.allclose(trainer.compute_loss(model, batch, num_items_in_batch=2 * n), ours / 2, atol=1e-6)


def test_training_lowers_the_loss_saves_a_peft_adapter_and_is_deterministic(tmp_path):
    ds = make_ds()
    samples = build_samples(ds, n_candidates=4, seed=0, history_len=3, max_samples=16)
    style = make_style(tok(), LETTERS, max_history=3)
    batch = batch_of(LETTERS, samples, ds)
    c = cfg(num_epochs=2, eval_steps=100)  # 8 steps; validated once, at the end
    before = answer_loss(fresh_model(), batch)
    runs = []
    for run in ("a", "b"):
        model = fresh_model()
        summary = train_reranker(model, tok(), style, ds, samples, val_rows(ds), c, tmp_path / run, seed=0)
        runs.append((model, summary))
    model, summary = runs[0]
    adapter = tmp_path / "a" / "adapter"
    assert summary["global_step"] == 8 and not summary["stopped_early"] and summary["n_val_users"] == ds.n_users
    assert [v["step"] for v in summary["validations"]] == [8]  # the real ranker validated at the end
    assert 0.0 < summary["validations"][0]["NDCG@10"] <= 1.0
    assert json.loads((tmp_path / "a" / "train_summary.json").read_text())["global_step"] == 8
    assert {"adapter_config.json", "adapter_model.safetensors", "prompt_style.json"} <= {p.name for p in adapter.iterdir()}
    assert PromptStyle.load(adapter) == style
    after = answer_loss(model, batch)
    assert after < before - 0.2, (before, after)

    # The saved adapter loads back (peft format) onto a fresh base and gives the same logits.
    loaded = load_adapter(fresh_model(), tmp_path / "a")
    with torch.no_grad():
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        assert torch.equal(loaded(**kw).logits, model.eval()(**kw).logits)
    assert answer_loss(loaded, batch) == after

    # Same seed, same everything: identical adapter weights.
    a, b = lora_tensors(adapter), lora_tensors(tmp_path / "b" / "adapter")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # trained (lora_B starts at zero)


def test_early_stopping_keeps_the_best_adapter_and_resumes(tmp_path):
    ds = make_ds()
    samples = build_samples(ds, n_candidates=4, seed=0, history_len=3, max_samples=24)  # 6 steps/epoch
    style = make_style(tok(), LETTERS, max_history=3)
    calls = []

    def stub_scorer(model, rows):
        """Validation 1 ranks every target first; later ones rank it last: the best is step 2."""
        calls.append(len(rows))
        good = len(calls) == 1
        return [[(1.0 if (c == r["target"]) == good else 0.0) for c in r["candidates"]] for r in rows]

    c = cfg(num_epochs=2, eval_steps=2, patience=2, val_max_users=3, val_shuffled=False)  # one scorer call per validation
    summary = train_reranker(fresh_model(), tok(), style, ds, samples, val_rows(ds), c, tmp_path, seed=0, score_rows=stub_scorer)
    assert calls == [3, 3, 3]  # validated on the 3 sampled users at steps 2, 4, 6, then stopped
    assert summary["stopped_early"] and summary["global_step"] == 6 and summary["max_steps"] == 12
    assert summary["best_step"] == 2 and summary["best_metric"] == {"NDCG@10": 1.0}
    assert [v["NDCG@10"] for v in summary["validations"]] == pytest.approx([1.0, 1 / math.log2(5), 1 / math.log2(5)])  # rank 4 of 4
    ckpts = tmp_path / "checkpoints"
    best, last = lora_tensors(tmp_path / "adapter"), lora_tensors(ckpts / "checkpoint-6")
    assert all(torch.equal(best[k], v) for k, v in lora_tensors(ckpts / "checkpoint-2").items())
    assert not all(torch.equal(best[k], v) for k, v in last.items())
    events = b"".join(p.read_bytes() for p in (tmp_path / "tensorboard").iterdir())
    assert b"eval/NDCG@10" in events and b"train/loss" in events

    with pytest.raises(PipelineError, match="resume"):  # never mixes with an earlier run's checkpoints
        train_reranker(fresh_model(), tok(), style, ds, samples, val_rows(ds), c, tmp_path, seed=0, score_rows=stub_scorer)
    # Resuming continues at step 6 with the early-stopping counter restored: one more worse
    # validation (step 8) ends it, and the best adapter is still step 2's.
    resumed = train_reranker(
        fresh_model(), tok(), style, ds, samples, val_rows(ds), cfg(**{**c.__dict__, "resume": True}), tmp_path,
        seed=0, score_rows=stub_scorer,
    )
    assert resumed["resumed_from"].endswith("checkpoint-6")
    assert resumed["global_step"] == 8 and resumed["best_step"] == 2 and len(calls) == 4
    assert all(torch.equal(best[k], v) for k, v in lora_tensors(tmp_path / "adapter").items())


def test_validation_rows_and_metrics():
    ds = make_ds()
    rows = val_rows(ds)
    rows[1] = {**rows[1], "target": "not-a-candidate"}
    chosen = select_val_rows(rows, None, seed=0)
    assert [r["user"] for r in chosen] == [r["user"] for r in rows if r["user"] != ds.user_ids[1]]  # covered only
    three = select_val_rows(rows, 3, seed=0)
    assert len(three) == 3 and three == select_val_rows(rows, 3, seed=0) and all(r in chosen for r in three)
    scores = [[0.3, 1.0, 0.5, 0.2], [1.0, 0.0, 0.0, 0.0]]  # targets (candidate 0) ranked 3rd and 1st
    m = ranking_metrics(scores, chosen[:2])
    assert m["Recall@1"] == 0.5 and m["MRR@10"] == pytest.approx((1 / 3 + 1) / 2)
    with pytest.raises(PipelineError, match="score lists"):
        ranking_metrics(scores[:1], chosen[:2])


def test_config_checks_and_missing_adapter(tmp_path):
    with pytest.raises(PipelineError, match="lora_dropout"):
        RerankerConfig(lora_dropout=1.0).validate()
    with pytest.raises(PipelineError, match="train_candidates"):
        RerankerConfig(train_candidates=1).validate()
    with pytest.raises(PipelineError, match="binding_mix_epochs must be >= 0"):
        RerankerConfig(binding_mix_epochs=-1.0).validate()
    with pytest.raises(PipelineError, match="adapter_config.json"):
        load_adapter(fresh_model(), tmp_path)
    with pytest.raises(PipelineError, match="lora_target_modules"):
        train_reranker(
            fresh_model(), tok(), make_style(tok(), LETTERS), make_ds(), build_samples(make_ds(), n_candidates=3), [],
            cfg(lora_target_modules=["no_such_proj"]), tmp_path,
        )
