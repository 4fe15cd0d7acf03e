"""Stage-1 domain-adaptive pre-training (`rerank.training.pretrain`): texts built from TRAIN histories only,
in the prompt's history format, every token supervised; stage 2 starts from the stage-1 adapter."""
from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from rerank.model.adapter import add_lora
from rerank.prompting.labels import LETTERS, encode
from rerank.prompting.prompts import build_prompt, history_text
from rerank.prompting.style import make_style
from rerank.training.collate import IGNORE_INDEX
from rerank.training.pretrain import PRETRAIN_ADAPTER_DIR, PRETRAIN_SUMMARY, HistoryTexts, RightPadCollator, history_windows
from rerank.training.samples import build_samples
from rerank.training.stages import train_reranker
from tests.helpers.data import make_ds
from tests.helpers.training import cfg, fresh_model, tok, val_rows


def test_windows_cover_each_train_sequence_and_nothing_held_out():
    ds = make_ds()
    windows = history_windows(ds, 4)
    for u in range(ds.n_users):
        mine = [w for user, w in windows if user == u]
        train = ds.train_sequence(u)
        # consecutive windows of 4, in order; a last window of one item is dropped
        expected = [tuple(train[i : i + 4]) for i in range(0, len(train), 4) if len(train[i : i + 4]) >= 2]
        assert mine == expected
        assert not {i for w in mine for i in w} & set(ds.sequences[u][-2:])  # val and test items never seen


def test_text_is_the_prompt_history_block_and_every_token_carries_loss():
    ds, style = make_ds(), make_style(tok(), LETTERS, max_history=4)
    texts = HistoryTexts(history_windows(ds, 4), ds.titles, tok(), style)
    first = [ds.titles[i] for i in texts.windows[0][1]]
    assert texts.text(0) == "User history:\n" + "\n".join(f"{n}. {t}" for n, t in enumerate(first, 1))
    # the same block, byte for byte, appears in a reranking prompt with that history
    assert history_text(first, tok(), style) in build_prompt(first, ["Cand A", "Cand B"], tok(), style)
    ex = texts[0]
    assert ex["input_ids"] == encode(tok(), texts.text(0)) + [tok().eos_token_id]
    assert ex["labels"] == ex["input_ids"]


def test_right_padding_masks_only_padding_even_when_pad_is_eos():
    eos = tok().eos_token_id
    batch = RightPadCollator(pad_token_id=eos)([{"input_ids": [5, 6, eos], "labels": [5, 6, eos]},
                                                {"input_ids": [7, eos], "labels": [7, eos]}])
    assert batch["input_ids"].tolist() == [[5, 6, eos], [7, eos, eos]]
    assert batch["labels"].tolist() == [[5, 6, eos], [7, eos, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_two_stage_run_continues_the_stage1_adapter(tmp_path):
    ds = make_ds()
    style = make_style(tok(), LETTERS, max_history=4)
    c = cfg(pretrain_steps=2, pretrain_batch_size=2, pretrain_learning_rate=1e-2, max_train_samples=8, eval_steps=1, patience=1)
    samples = build_samples(ds, n_candidates=4, seed=0, history_len=4, max_samples=8)
    summary = train_reranker(fresh_model(), tok(), style, ds, samples, val_rows(ds), c, tmp_path, seed=0)
    stage1 = json.loads((tmp_path / PRETRAIN_SUMMARY).read_text())
    assert stage1["global_step"] == 2 and stage1["n_windows"] == len(history_windows(ds, 4))
    assert summary["pretrain_adapter"] == str(tmp_path / PRETRAIN_ADAPTER_DIR)
    saved = load_file(tmp_path / PRETRAIN_ADAPTER_DIR / "adapter_model.safetensors")
    lora_b = {k: v for k, v in saved.items() if "lora_B" in k}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values())  # stage 1 moved B off its zero init
    # Stage 2 starts from exactly these weights, trainable (a fresh adapter would have B = 0).
    model = add_lora(fresh_model(), c, seed=0, init_adapter=tmp_path / PRETRAIN_ADAPTER_DIR)
    loaded = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert all(p.requires_grad for p in loaded.values())
    for name, value in lora_b.items():
        match = [p for n, p in loaded.items() if n.replace(".default", "").endswith(name.split("base_model.model.")[-1])]
        assert len(match) == 1 and torch.equal(match[0].detach(), value)
