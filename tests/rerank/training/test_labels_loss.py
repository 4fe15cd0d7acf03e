"""The "labels" training loss (`rerank.training.trainer`), per-epoch candidate orders (`rerank.training.collate`) and
the LoRA layer selection (all-linear, lora_layers), on tiny-qwen2 with the real Qwen2 tokenizer."""
from __future__ import annotations

import collections

import pytest
import torch
from transformers import TrainingArguments

from rerank.model.adapter import add_lora
from rerank.prompting.labels import LETTERS, NUMBERS, encode
from rerank.prompting.prompts import build_prompt, label_tokens
from rerank.prompting.style import make_style
from rerank.training.collate import TrainingTexts, collator_for, epoch_order
from rerank.training.samples import build_samples
from rerank.training.stages import train_reranker
from rerank.training.rerank_trainer import RerankTrainer
from tests.helpers.data import make_ds
from tests.helpers.training import cfg, fresh_model, labels_trainer, tok, val_rows


def setup(scheme, k=12, n=3):
    ds = make_ds()
    samples = build_samples(ds, n_candidates=k, seed=0, max_samples=n)
    style = make_style(tok(), scheme, max_history=3)
    texts = TrainingTexts(samples, ds.titles, tok(), style)
    batch = collator_for(tok())([texts[i] for i in range(len(samples))])
    return ds, samples, style, batch, label_tokens(tok(), style).for_k(k)


def hand_scores(model, prompt: str, tokens) -> torch.Tensor:
    """log P(label k's scored tokens | prompt) by teacher forcing each label alone, no padding, full vocabulary."""
    ids = encode(tok(), prompt)
    out = []
    for seq in tokens.scored_ids:
        full = torch.tensor([ids + list(seq)])
        logp = model(input_ids=full).logits[0].float().log_softmax(-1)
        out.append(sum(logp[len(ids) - 1 + d, t] for d, t in enumerate(seq)))
    return torch.stack(out)


@pytest.mark.parametrize("scheme", [LETTERS, NUMBERS])  # numbers: "10".."12" two tokens, "1" + end of turn
def test_labels_loss_is_the_cross_entropy_over_the_label_scores(scheme, tmp_path):
    ds, samples, style, batch, tokens = setup(scheme)
    assert batch["prompt_attention_mask"].eq(0).any()  # left padding present
    model = fresh_model().eval()
    with torch.no_grad():
        ours = labels_trainer(tmp_path, model, tokens).compute_loss(model, batch)
        hand = []
        for s in samples:
            prompt = build_prompt([ds.titles[i] for i in s.history], [ds.titles[i] for i in s.candidates], tok(), style)
            scores = hand_scores(model, prompt, tokens)
            hand.append(-(scores.log_softmax(-1)[s.target_index]))
        hand = torch.stack(hand).mean()
    assert ours.item() == pytest.approx(hand.item(), abs=1e-4)
    # Untrained: near the uniform loss over the K labels, far from the vocabulary loss.
    assert abs(ours.item() - torch.log(torch.tensor(12.0)).item()) < 1.0


def test_labels_loss_ignores_the_other_vocabulary_rows(tmp_path):
    ds, samples, style, batch, tokens = setup(LETTERS)
    model = fresh_model().eval()
    trainer = labels_trainer(tmp_path, model, tokens)
    vocab = RerankTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "v"), use_cpu=True, report_to="none"),
                          data_collator=collator_for(tok()))
    with torch.no_grad():
        before, vocab_before = trainer.compute_loss(model, batch), vocab.compute_loss(model, batch)
        # Rows of tokens that neither appear in the batch nor are labels: in the tied output layer
        # they only change logits of other vocabulary entries.
        used = set(batch["input_ids"].flatten().tolist()) | {seq[0] for seq in tokens.scored_ids}
        rows = torch.tensor([i for i in range(1000, 3000) if i not in used])
        model.get_output_embeddings().weight[rows] += 5.0
        after, vocab_after = trainer.compute_loss(model, batch), vocab.compute_loss(model, batch)
    assert torch.equal(before, after)
    assert abs(vocab_after.item() - vocab_before.item()) > 1e-3  # the vocab loss does read them


def test_labels_loss_with_a_vocab_term_and_accumulation_counts(tmp_path):
    ds, samples, style, batch, tokens = setup(LETTERS)
    model = fresh_model().eval()
    with torch.no_grad():
        labels_only = labels_trainer(tmp_path, model, tokens).compute_loss(model, batch)
        vocab = RerankTrainer(model=model, args=TrainingArguments(output_dir=str(tmp_path / "v"), use_cpu=True, report_to="none"),
                              data_collator=collator_for(tok())).compute_loss(model, batch)
        mixed = labels_trainer(tmp_path, model, tokens, vocab_weight=0.5).compute_loss(model, batch)
        n_tokens = int(batch["labels"][:, 1:].ne(-100).sum())
        halved = labels_trainer(tmp_path, model, tokens).compute_loss(
            model, batch, num_items_in_batch={"prompts": 2 * len(samples), "tokens": n_tokens}
        )
    assert mixed.item() == pytest.approx(labels_only.item() + 0.5 * vocab.item(), rel=1e-5)
    assert halved.item() == pytest.approx(labels_only.item() / 2, rel=1e-5)  # a step of twice the prompts


def test_training_with_the_labels_loss_learns_and_logs_curves(tmp_path):
    ds = make_ds()
    samples = build_samples(ds, n_candidates=4, seed=0, history_len=3, max_samples=8)
    style = make_style(tok(), LETTERS, max_history=3)
    tokens = label_tokens(tok(), style).for_k(4)
    batch = collator_for(tok())([TrainingTexts(samples, ds.titles, tok(), style)[i] for i in range(8)])
    model = fresh_model()
    with torch.no_grad():
        before = labels_trainer(tmp_path / "x", model.eval(), tokens).compute_loss(model, batch).item()
    # One full batch per step, same orders every epoch (a memorisation check), validated every 10 steps.
    c = cfg(num_epochs=30, train_batch_size=8, learning_rate=3e-3, eval_steps=10, patience=10, loss="labels",
            lora_target_modules="all-linear", reshuffle_each_epoch=False)
    summary = train_reranker(model, tok(), style, ds, samples, val_rows(ds), c, tmp_path / "run", seed=0)
    assert summary["loss"] == "labels" and summary["global_step"] == 30
    assert [e["step"] for e in summary["train_losses"]] == list(range(1, 31))
    assert [v["step"] for v in summary["validations"]] == [10, 20, 30]
    assert all({"NDCG@10", "shuffled_NDCG@10"} <= set(v) and 0 <= v["shuffled_NDCG@10"] <= 1 for v in summary["validations"])
    if summary["best_step"] == 30:  # the last adapter is kept: it learnt the batch
        with torch.no_grad():
            after = labels_trainer(tmp_path / "y", model.eval(), tokens).compute_loss(model, batch).item()
        assert after < before - 0.2, (before, after)
    late = sum(e["loss"] for e in summary["train_losses"][-5:]) / 5
    assert late < before - 0.2, (before, late)  # the training loss fell


def test_the_logged_learning_rate_warms_up_then_decays_to_zero(tmp_path):
    """train_losses carry each logged step's learning rate (the curve beside the loss): warm-up steps,
    the peak, then the linear decay to 0 at the last step (paper)."""
    ds = make_ds()
    samples = build_samples(ds, n_candidates=4, seed=0, history_len=3, max_samples=8)
    c = cfg(num_epochs=3, learning_rate=1e-3, warmup_steps=2, loss="labels", eval_steps=10**9)
    summary = train_reranker(fresh_model(), tok(), make_style(tok(), LETTERS, max_history=3), ds, samples, [], c, tmp_path, seed=0)
    rates = [e["learning_rate"] for e in summary["train_losses"]]
    assert rates == [0, pytest.approx(0.5e-3), pytest.approx(1e-3), pytest.approx(0.75e-3), pytest.approx(0.5e-3), pytest.approx(0.25e-3)]


def test_each_epoch_redraws_the_candidate_order():
    ds = make_ds()
    samples = build_samples(ds, n_candidates=8, seed=0)
    assert all(epoch_order(s, 0, 0) == s and epoch_order(s, 3, None) == s for s in samples)
    slots = collections.Counter()
    moved = 0
    for s in samples:
        e1, e2 = epoch_order(s, 1, 0), epoch_order(s, 2, 0)
        assert e1 == epoch_order(s, 1, 0)  # seeded
        for e in (e1, e2):
            assert sorted(e.candidates) == sorted(s.candidates) and e.target == s.target and e.history == s.history
            slots[e.target_index] += 1
        moved += e1.candidates != s.candidates
    assert moved >= len(samples) - 1
    assert set(slots) == set(range(8))  # every slot gets targets: no slot is learnable as the answer

    texts = TrainingTexts(samples[:1], ds.titles, tok(), make_style(tok(), LETTERS), reshuffle_seed=0)
    first = texts[0]
    texts.epoch = 1
    assert texts[0]["target_index"] == epoch_order(samples[0], 1, 0).target_index
    assert texts[0]["input_ids"] != first["input_ids"] or texts[0]["target_index"] == first["target_index"]


def test_all_linear_and_top_layers():
    model = add_lora(fresh_model(), cfg(lora_target_modules="all-linear", lora_layers=1), seed=0)
    adapted = {n.split(".lora_A")[0] for n, _ in model.named_modules() if n.endswith("lora_A")}
    n_layers = model.config.num_hidden_layers
    assert all(f"layers.{n_layers - 1}." in n for n in adapted)  # only the top layer
    kinds = {n.rsplit(".", 1)[1] for n in adapted}
    assert kinds == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not any("lm_head" in n for n in adapted)
    with pytest.raises(Exception, match="lora_layers"):
        add_lora(fresh_model(), cfg(lora_layers=n_layers + 1), seed=0)


def test_the_kept_adapter_can_follow_the_shuffled_validation(tmp_path):
    from pipeline.config import RerankerConfig
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match="val_shuffled"):
        RerankerConfig(best_by="shuffled", val_shuffled=False).validate()
    ds = make_ds()
    samples = build_samples(ds, n_candidates=4, seed=0, history_len=3, max_samples=8)
    style = make_style(tok(), LETTERS, max_history=3)
    calls = []

    def stub(model, rows):
        """Unshuffled validations rank the target first; the shuffled ones rank it first only at the 2nd."""
        calls.append(rows)
        shuffled_call = len(calls) % 2 == 0
        good = not shuffled_call or len(calls) == 4
        return [[(1.0 if (c == r["target"]) == good else 0.0) for c in r["candidates"]] for r in rows]

    c = cfg(num_epochs=3, eval_steps=2, patience=10, best_by="shuffled")  # 6 steps, validations at 2, 4, 6
    summary = train_reranker(fresh_model(), tok(), style, ds, samples, val_rows(ds), c, tmp_path, seed=0, score_rows=stub)
    assert summary["best_step"] == 4 and summary["best_metric"] == {"shuffled_NDCG@10": 1.0}
    assert [r["candidates"] for r in calls[1]] != [r["candidates"] for r in calls[0]]  # really another order


def test_a_wrapped_model_takes_the_full_path_with_the_same_loss(tmp_path):
    """DistributedDataParallel hides the model's methods and must run its own forward: the labels
    loss then projects the whole vocabulary, and the loss is the same."""
    ds, samples, style, batch, tokens = setup(LETTERS)
    model = fresh_model().eval()

    class Wrapper(torch.nn.Module):  # like DDP: forward only, no get_output_embeddings / get_decoder
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, **kw):
            return self.module(**kw)

    from rerank.training.loss import labels_loss_sum

    args = (batch["prompt_input_ids"], batch["prompt_attention_mask"], batch["target_index"], tokens, tok().pad_token_id)
    with torch.no_grad():
        direct = labels_loss_sum(model, *args)
        wrapped = labels_loss_sum(Wrapper(model), *args)
    assert wrapped.item() == pytest.approx(direct.item(), abs=1e-4)
