"""The smoke experiment end to end (both stages, real scripts): the run-directory contract of
SPEC.md, candidates/rankings consistency, and the metrics relations the paper's tables rely on."""
import json

import pytest

from pipeline.candidates import read_rows
from pipeline.metrics import candidate_rank, metrics_from_ranks
from conftest import ONE_THREAD, run_script


def test_run_directory_has_every_contract_file(smoke_run):
    out, stdout = smoke_run
    for name in ["config.yaml", "run.json", "metrics.json", "metrics.md", "dataset_stats.json",
                 "candidates_train.jsonl", "candidates_val.jsonl", "candidates_test.jsonl",
                 "rankings_val.jsonl", "rankings_test.jsonl", "adapter/adapter_config.json",
                 "adapter/prompt_style.json", "retriever.pt"]:
        assert (out / name).exists(), name
    run = json.loads((out / "run.json").read_text())
    assert run["end"] and run["packages"]["torch"].startswith("2.13") and "machine" in run
    assert "Reranker (subset)" in stdout and "Retriever (overall)" in stdout


def test_metrics_sections_and_relations(smoke_run):
    out, _ = smoke_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"val", "test"}
    for split, sec in metrics.items():
        assert {"retriever", "retriever_subset", "subset", "overall", "coverage", "n_users", "n_covered"} <= set(sec)
        assert "NDCG@50" in sec["retriever"]  # the retriever run's full-catalogue metrics
        assert sec["coverage"] == pytest.approx(sec["n_covered"] / sec["n_users"])
        for key, value in sec["subset"].items():
            assert sec["overall"][key] == pytest.approx(value * sec["coverage"])
        # overall retriever Recall@20 over all users == coverage (the candidates are its top 20)
        assert sec["retriever"]["Recall@20"] == pytest.approx(sec["coverage"])
        # retriever_subset re-weighted by coverage gives the full-catalogue retriever at k <= 20
        for k in (1, 5, 10, 20):
            assert sec["retriever_subset"][f"NDCG@{k}"] * sec["coverage"] == pytest.approx(sec["retriever"][f"NDCG@{k}"])


def test_rankings_match_candidates_and_recompute_to_the_metrics(smoke_run):
    out, _ = smoke_run
    metrics = json.loads((out / "metrics.json").read_text())
    for split in ("val", "test"):
        cands = read_rows(out / f"candidates_{split}.jsonl")
        ranks = read_rows(out / f"rankings_{split}.jsonl")
        covered = [r for r in cands if r["target"] in r["candidates"]]
        assert [r["user"] for r in ranks] == [r["user"] for r in covered]
        for c, r in zip(covered, ranks):
            assert r["candidates"] == c["candidates"] and r["target"] == c["target"] and r["history"] == c["history"]
            assert r["label_scheme"] == "letters"
            assert not set(c["candidates"]) & set(c["history"])
        recomputed = metrics_from_ranks([candidate_rank(r["scores"], r["candidates"], r["target"]) for r in ranks], [1, 5, 10, 20])
        assert recomputed == pytest.approx(metrics[split]["subset"])


def test_fixed_seed_gives_identical_candidates_rankings_and_metrics(smoke_run, tmp_path):
    out, _ = smoke_run
    again = tmp_path / "again"
    proc = run_script("scripts/run_experiment.py", "--config", "configs/experiments/smoke.yaml", "--out", str(again), env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["candidates_val.jsonl", "candidates_test.jsonl", "rankings_val.jsonl", "rankings_test.jsonl", "metrics.json"]:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
