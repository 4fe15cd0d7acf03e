"""A tiny reranker to train: the tiny-qwen2 model and tokenizer, a RerankerConfig, validation rows."""
from __future__ import annotations

import copy
import functools

from transformers import TrainingArguments

from pipeline.config import RerankerConfig
from rerank.model.sources import load_model_and_tokenizer
from rerank.model.standins import TINY_QWEN2
from rerank.training.collate import collator_for
from rerank.training.rerank_trainer import RerankTrainer
from tests.helpers.tokenizers import CACHE_DIR


@functools.lru_cache(maxsize=None)
def tiny_model_and_tokenizer():
    return load_model_and_tokenizer(TINY_QWEN2, cache_dir=CACHE_DIR)


def fresh_model():
    """A pristine copy of tiny-qwen2 (training injects LoRA layers into the model it gets)."""
    return copy.deepcopy(tiny_model_and_tokenizer()[0])


def tok():
    return tiny_model_and_tokenizer()[1]


def cfg(**kw) -> RerankerConfig:
    base = dict(train_batch_size=4, learning_rate=1e-2, warmup_steps=0, logging_steps=1, rank_batch_size=8)
    return RerankerConfig(**{**base, **kw})


def val_rows(ds, n=None):
    """Covered val rows: the val target among 4 candidates (retriever order), history = train items."""
    rows = []
    for u in range(ds.n_users):
        seq = ds.sequences[u]
        cands = [seq[-2], *[i for i in (1, 2, 3, 5, 8) if i not in seq][:3]]
        rows.append({
            "user": ds.user_ids[u], "history": [ds.item_ids[i] for i in seq[:-2]],
            "candidates": [ds.item_ids[i] for i in cands], "scores": [0.0] * 4, "target": ds.item_ids[seq[-2]],
        })
    return rows


def labels_trainer(tmp_path, model, tokens, vocab_weight=0.0):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to="none")
    return RerankTrainer(
        model=model, args=args, data_collator=collator_for(tok()), loss="labels", vocab_loss_weight=vocab_weight,
        train_tokens=tokens, pad_id=tok().pad_token_id,
    )


def samples_batch_and_rows(style, n: int = 3, k: int = 6):
    """(a collated batch of n training prompts with k candidates, each line's tokens included; the
    same prompts as candidates-file rows; titles by item id): a training step's view and the ranker's
    view of one set of prompts."""
    from rerank.training.collate import TrainingTexts
    from rerank.training.samples import build_samples
    from tests.helpers.data import make_ds

    ds = make_ds()
    samples = build_samples(ds, n_candidates=k, seed=0, max_samples=n)
    texts = TrainingTexts(samples, ds.titles, tok(), style, readout=True)
    batch = collator_for(tok())([texts[i] for i in range(n)])
    rows = [
        {"user": ds.user_ids[s.user], "history": [ds.item_ids[i] for i in s.history],
         "candidates": [ds.item_ids[i] for i in s.candidates], "target": ds.item_ids[s.target]}
        for s in samples
    ]
    return batch, rows, dict(zip(ds.item_ids[1:], ds.titles[1:]))
