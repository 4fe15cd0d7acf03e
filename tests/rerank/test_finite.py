"""Numbers are finite or refused: config floats, the metric code, the rankings and metrics files,
the ranking stage and training (a NaN scored first used to give a "perfect" NDCG with exit 0)."""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from pipeline.atomic import write_json, write_jsonl
from pipeline.candidates import read_rows
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.metrics import candidate_rank, full_catalogue_ranks
from rerank.inference import rank_split as rank_split_module
from rerank.inference.rank_split import rank_split
from rerank.prompting.labels import LETTERS
from rerank.prompting.style import make_style
from rerank.training.samples import build_samples
from rerank.training.stages import train_reranker
from tests.helpers.data import make_ds
from tests.helpers.rows import CFG, ITEMS, ROWS
from tests.helpers.tokenizers import qwen_tokenizer
from tests.helpers.training import cfg, fresh_model, tok, val_rows


@pytest.mark.parametrize("override, key", [
    ("reranker.learning_rate=.nan", "reranker.learning_rate"),
    ("reranker.learning_rate=inf", "reranker.learning_rate"),  # a string YAML reads, taken as a number
    ("retriever.lr=-.inf", "retriever.lr"),
    ("reranker.fusion_weights=[0, .nan, 1]", "reranker.fusion_weights[1]"),
    ("reranker.max_grad_norm=1e999", "reranker.max_grad_norm"),
    ("analysis.variants={v: {learning_rate: .inf}}", "analysis.variants.v.learning_rate"),
])
def test_config_refuses_non_finite_floats_naming_the_key(override, key):
    with pytest.raises(PipelineError, match=re.escape(f"config key {key} must be a finite number")):
        load_config(None, [override])


def test_a_nan_target_score_is_refused_not_ranked_first():
    # Before: every comparison with NaN is False, so the NaN target had rank 1 (NDCG 1.0).
    with pytest.raises(PipelineError, match="not finite"):
        candidate_rank([1.0, math.nan, 0.5], ["a", "b", "c"], "b")
    with pytest.raises(PipelineError, match="not finite"):
        candidate_rank([math.inf, 0.0], ["a", "b"], "b")
    assert candidate_rank([1.0, 2.0, 0.5], ["a", "b", "c"], "c") == 3  # finite scores rank as before


def test_full_catalogue_ranks_refuse_nan_but_not_masked_minus_inf():
    scores = torch.tensor([[0.0, 1.0, 2.0, 3.0], [0.0, 1.0, math.nan, 3.0]])
    masked = torch.tensor([[True, False, False, False], [True, False, False, False]])
    with pytest.raises(PipelineError, match="item scores of batch row 1 are not finite"):
        full_catalogue_ranks(scores, torch.tensor([1, 1]), masked)
    ok = torch.tensor([[-math.inf, 1.0, 2.0, 3.0]])  # a masked item may hold -inf
    assert full_catalogue_ranks(ok, torch.tensor([1]), masked[:1]).tolist() == [3]
    with pytest.raises(PipelineError):  # ... an unmasked one may not
        full_catalogue_ranks(torch.tensor([[0.0, -math.inf, 2.0, 3.0]]), torch.tensor([2]), masked[:1])


def test_files_stay_strict_json(tmp_path):
    with pytest.raises(ValueError):
        write_jsonl(tmp_path / "r.jsonl", [{"scores": [math.nan]}])
    with pytest.raises(ValueError):
        write_json(tmp_path / "m.json", {"NDCG@10": math.inf})
    assert not list(tmp_path.iterdir())  # nothing half-written under the final name, no temp file left
    # A rankings file someone wrote with Python's default json (NaN literal) is refused on read.
    path = tmp_path / "rankings_val.jsonl"
    row = {"user": "u", "history": [], "candidates": ["a", "b"], "scores": [0.5, math.nan], "target": "a"}
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(PipelineError, match=r"line 1 holds NaN, which is not a finite number"):
        read_rows(path)


def test_rank_split_stops_on_a_nan_score_naming_split_and_user(monkeypatch):
    def nan_for_b(model, tokenizer, style, rows, titles, batch_size, permutations, seed, progress):
        return [[0.1, math.nan, 0.0, 0.0, 0.0] if r["user"] == "b" else [0.0] * 5 for r in rows]

    monkeypatch.setattr(rank_split_module, "rank_rows", nan_for_b)
    tok_ = qwen_tokenizer()
    with pytest.raises(PipelineError, match=r"LLM scores \(val\), user 'b': score nan of candidate 2 is not finite"):
        rank_split(None, tok_, make_style(tok_, LETTERS), ROWS, ITEMS, CFG, progress=False, split="val")


def test_training_stops_at_the_first_non_finite_loss(tmp_path):
    ds = make_ds()
    samples = build_samples(ds, n_candidates=4, seed=0, history_len=3, max_samples=16)
    model = fresh_model()
    with torch.no_grad():
        model.model.norm.weight[0] = math.nan  # every logit NaN from the first step: a diverged model
    with pytest.raises(PipelineError, match=r"reranker training: the training loss is nan at step 1 .*lower reranker.learning_rate"):
        train_reranker(model, tok(), make_style(tok(), LETTERS, max_history=3), ds, samples, val_rows(ds),
                       cfg(num_epochs=2, eval_steps=100), tmp_path / "run", seed=0)
    assert not (tmp_path / "run" / "train_summary.json").exists()


def test_scores_that_tie_every_candidate_of_every_user_are_refused(monkeypatch):
    # Before: reranker.learning_rate=1e30 collapsed the model (loss flat at 11.93, gradient norm 0),
    # every score tied, and "LLM alone" reported the retriever's order as its own, exit 0.
    monkeypatch.setattr(rank_split_module, "rank_rows", lambda model, tokenizer, style, rows, *a, **kw: [[-11.93] * 5 for _ in rows])
    tok_ = qwen_tokenizer()
    with pytest.raises(PipelineError, match=r"LLM scores \(test\): every candidate of each of the 3 users has the same score"):
        rank_split(None, tok_, make_style(tok_, LETTERS), ROWS, ITEMS, CFG, progress=False, split="test")
    one_differs = lambda model, tokenizer, style, rows, *a, **kw: [[0.0] * 4 + [float(r["user"] == "d")] for r in rows]
    monkeypatch.setattr(rank_split_module, "rank_rows", one_differs)
    rank_split(None, tok_, make_style(tok_, LETTERS), ROWS, ITEMS, CFG, progress=False, split="test")  # one informative user is enough
