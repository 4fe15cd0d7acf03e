"""Fail before spending (`rerank.preflight`): settings that cannot work stop the run before the
retriever trains or before the first training step, and the fix each message suggests passes."""
from __future__ import annotations

import re

import pytest

from pipeline.config import load_config
from pipeline.errors import PipelineError
from rerank.preflight import check_before_retriever, check_calibration_counts, check_prompt_budget
from rerank.prompting.labels import LETTERS
from rerank.prompting.style import make_style
from tests.helpers.cli import run_in_process, script_args, tiny_data
from tests.helpers.tokenizers import qwen_tokenizer, titles


def _fix(message: str) -> list[str]:
    """The `--set key=value` overrides a message suggests ("set a.b=c", "use a.b=c")."""
    return re.findall(r"(?:set|use) ([a-z_]+\.[a-z_]+=\S+?)(?=[ ,:;)]|$)", message)


def test_top_k_beyond_the_labels_stops_run_experiment_before_the_retriever(tmp_path, capfd):
    tiny_data(tmp_path / "data")
    # Before: the retriever trained (minutes on ML-100K), then the reranker refused its candidates
    # and the failed fresh run deleted the retriever's work with it.
    code, err = run_in_process("run_experiment", script_args(tmp_path, ["retriever.top_k=25"]), capfd)
    assert code == 2 and err.count("\n") == 1
    assert "retriever.top_k 25 is more than label scheme 'letters' has labels (20)" in err
    assert not (tmp_path / "out").exists()
    fix = _fix(err)
    assert fix == ["retriever.top_k=20"]
    check_before_retriever(load_config(None, ["retriever.top_k=25", *fix]))
    labels = "[" + ", ".join(f"L{i}" for i in range(25)) + "]"
    check_before_retriever(load_config(None, ["retriever.top_k=25", "reranker.label_scheme=custom", f"reranker.custom_labels={labels}"]))


def test_a_prompt_budget_too_small_stops_run_experiment_before_the_retriever(tmp_path, capfd):
    tiny_data(tmp_path / "data")
    code, err = run_in_process("run_experiment", script_args(tmp_path, ["reranker.max_prompt_tokens=50"]), capfd)
    assert code == 2 and err.count("\n") == 1 and "> max_prompt_tokens 50: raise reranker.max_prompt_tokens" in err
    assert not (tmp_path / "out").exists()  # before: found after the retriever had trained


def test_a_prompt_budget_the_longest_titles_cannot_fit_is_refused_and_the_fix_fits():
    tok = qwen_tokenizer()
    catalogue = titles(40, "A rather long film title number ")
    small = make_style(tok, LETTERS, max_prompt_tokens=120)
    with pytest.raises(PipelineError, match=r"the 20 candidates alone make a \d+-token prompt > max_prompt_tokens 120: raise reranker.max_prompt_tokens"):
        check_prompt_budget(small, tok, catalogue, 20)
    check_prompt_budget(make_style(tok, LETTERS, max_prompt_tokens=1536), tok, catalogue, 20)


def _rows(prefix: str, counts: list[int]) -> list[dict]:
    return [
        {"user": f"{prefix}{n}", "history": [], "candidates": [f"i{j}" for j in range(k)], "scores": [0.0] * k, "target": "i0"}
        for n, k in enumerate(counts)
    ]


def test_calibration_without_a_val_user_of_some_candidate_count_is_refused_with_a_fix_that_works():
    rows = {"val": _rows("v", [20] * 30 + [15]), "test": _rows("t", [20, 15])}
    cfg = load_config(None, ["reranker.calibration=permuted", "reranker.calibration_users=4"])
    # 4 sampled users of 31 miss the one val user with 15 candidates: the prior for K=15 would be
    # missing after all the ranking (before: found only then).
    with pytest.raises(PipelineError, match="no validation user with 15 candidates") as err:
        check_calibration_counts(rows, cfg.reranker, cfg.seed)
    fix = _fix(str(err.value))
    assert fix == ["reranker.calibration_users=null"]
    fixed = load_config(None, ["reranker.calibration=permuted", *fix])
    check_calibration_counts(rows, fixed.reranker, fixed.seed)
    # No val user has 12 candidates at all: only content-free prompts can give that prior.
    rows["test"] = _rows("t", [12])
    with pytest.raises(PipelineError) as err:
        check_calibration_counts(rows, fixed.reranker, fixed.seed)
    assert _fix(str(err.value)) == ["reranker.calibration=content_free"]
