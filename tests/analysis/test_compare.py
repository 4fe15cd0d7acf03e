"""Variant comparisons (analysis/compare.py, scripts/compare_labels.py, scripts/compare_training.py)
on the smoke run's candidates: one table per comparison, finished variants kept on a re-run, a
third label scheme added by config alone, valid-label mass read from the rankings."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from analysis.compare import valid_label_mass
from pipeline.candidates import raw_scores, read_rows
from tests.helpers.scripts import run_script

SMOKE = ("--config", "configs/experiments/smoke.yaml")
LOWER = "[" + ", ".join("abcdefghijklmnopqrst") + "]"


def compare(script, out, retriever_run, variants, *extra):
    return run_script(f"scripts/{script}.py", *SMOKE, "--out", str(out), "--set", f"retriever_run={retriever_run}",
                      "--set", f"analysis.variants={variants}", *extra)


@pytest.fixture(scope="module")
def labels_run(smoke_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "labels"
    proc = compare("compare_labels", out, smoke_run[0], "{letters: {label_scheme: letters}, numbers: {label_scheme: numbers}}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_label_table_counts_multi_token_labels_and_valid_mass(labels_run):
    out, proc = labels_run
    data = json.loads((out / "compare_labels.json").read_text())
    assert list(data) == ["letters", "numbers"]
    # Qwen's tokenizer: letters are one token each; numbers 10..20 are two tokens ("1","0"...)
    assert data["letters"]["labels"]["multi_token_labels"] == []
    assert data["numbers"]["labels"]["multi_token_labels"] == [str(i) for i in range(10, 21)]
    assert data["numbers"]["labels"]["scored_with_end_token"] == ["1", "2"]  # prefixes of 10..20
    for name in data:
        rankings = read_rows(out / name / "rankings_test.jsonl")
        mass = valid_label_mass(rankings)
        assert all(0 < m <= 1 + 1e-6 for m in mass)  # disjoint label events: at most all the probability
        assert data[name]["labels"]["valid_mass_mean"] == pytest.approx(sum(mass) / len(mass))
        assert mass[0] == pytest.approx(sum(math.exp(s) for s in raw_scores(rankings[0])))  # log-probs, before calibration/fusion
    table = (out / "compare_labels.md").read_text()
    assert "| retriever order |" in table and "| letters | A..T | 0 |" in table and "| numbers | 1..20 | 11 |" in table
    header = (out / "compare_labels.csv").read_text().splitlines()[0]
    assert header.startswith("variant,labels,multi-token labels,valid-label mass,NDCG@5 (subset)")


def test_a_third_scheme_is_config_only_and_finished_variants_are_kept(labels_run, smoke_run):
    out, _ = labels_run
    before = (out / "letters" / "rankings_test.jsonl").read_bytes()
    proc = compare("compare_labels", out, smoke_run[0],
                   "{letters: {label_scheme: letters}, numbers: {label_scheme: numbers}, "
                   f"lower: {{label_scheme: custom, custom_labels: {LOWER}}}}}", "--resume")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "variant letters: kept" in proc.stdout and "variant numbers: kept" in proc.stdout
    assert "variant lower: training" in proc.stdout
    assert (out / "letters" / "rankings_test.jsonl").read_bytes() == before
    data = json.loads((out / "compare_labels.json").read_text())
    assert data["lower"]["labels"]["labels"][:3] == ["a", "b", "c"]


def test_a_finished_variant_made_with_another_config_is_not_reused(labels_run, smoke_run):
    out, _ = labels_run
    proc = compare("compare_labels", out, smoke_run[0], "{letters: {label_scheme: letters, lora_r: 4}}", "--resume")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "another config" in proc.stderr and "lora_r" in proc.stderr


def test_a_finished_variant_trained_on_other_prompts_is_not_reused(labels_run, smoke_run, tmp_path):
    """Same config, other prompt text (a run made before the code's candidate lines changed): its
    figures belong to another prompt, so a re-run refuses it instead of tabling it as current."""
    out = tmp_path / "labels"
    shutil.copytree(labels_run[0], out)
    style_file = out / "letters" / "adapter" / "prompt_style.json"
    style = json.loads(style_file.read_text())
    style["candidate_format"] = "({label}) {title}"  # the paper's line, which this code no longer writes
    style_file.write_text(json.dumps(style))
    proc = compare("compare_labels", out, smoke_run[0], "{letters: {label_scheme: letters}}", "--resume")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "other prompts (candidate_format: '({label}) {title}' there" in proc.stderr and "delete" in proc.stderr


@pytest.mark.parametrize("variants, message", [
    ("{}", "analysis.variants is empty"),
    ("{x: {label_schem: numbers}}", "unknown config key analysis.variants.x.'label_schem'"),
])
def test_bad_variants_stop_at_start(tmp_path, smoke_run, variants, message):
    proc = compare("compare_labels", tmp_path / "out", smoke_run[0], variants)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "out" / "x").exists()


def test_training_variants_table(smoke_run, tmp_path):
    proc = compare("compare_training", tmp_path / "t", smoke_run[0],
                   "{random: {train_negatives: random}, hard: {train_negatives: retriever}, "
                   "two_stage: {pretrain_steps: 2, pretrain_batch_size: 4}}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((tmp_path / "t" / "compare_training.json").read_text())
    assert data["two_stage"]["train"]["pretrain_adapter"].endswith("pretrain_adapter")
    assert data["random"]["train"]["pretrain_adapter"] is None
    assert json.loads((tmp_path / "t" / "two_stage" / "pretrain_summary.json").read_text())["global_step"] == 2
    table = (tmp_path / "t" / "compare_training.md").read_text()
    assert "| hard | retriever | 0 |" in table and "| two_stage | random | 2 |" in table


def test_llm_alone_vs_the_first_variant_is_paired_over_shared_users():
    """The label comparison's own question: each variant's LLM-alone NDCG@10 minus the first's, per
    user, over the users both ranked (hand-computed mean); a readout's scores are no log-probs."""
    from pathlib import Path

    from analysis.compare import VariantResult, llm_rank, llm_vs_first

    def variant(name, ranks):
        return VariantResult(name, Path(name), {}, {}, {}, None, 20, llm_ranks=ranks)

    first = variant("letters", {"u1": 1, "u2": 2, "u3": None})
    other = variant("numbers", {"u1": 1, "u2": 1, "u3": 3, "u4": 1})  # u4: not ranked by the first
    got = llm_vs_first([first, other])["numbers"]
    want = ((1 - 1) + (1 - 1 / math.log2(3)) + (1 / math.log2(4) - 0)) / 3
    assert got["n"] == 3 and got["mean_diff"] == pytest.approx(want)
    assert got["ci_low"] <= got["mean_diff"] <= got["ci_high"]
    row = {"candidates": ["a", "b", "c"], "target": "c", "scores": [3.0, 2.0, 1.0], "llm_scores": [0.0, 1.0, 2.0]}
    assert llm_rank(row) == 1 and llm_rank({k: v for k, v in row.items() if k != "llm_scores"}) == 3
