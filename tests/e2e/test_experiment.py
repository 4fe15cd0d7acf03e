"""The smoke experiment end to end (both stages, real scripts): the run-directory contract of
SPEC.md, candidates/rankings consistency, and the metrics relations the paper's tables rely on."""
import json

import pytest

from pipeline.candidates import read_rows
from pipeline.metrics import candidate_rank, metrics_from_ranks
from rerank.inference.fusion import fuse
from tests.helpers.scripts import ONE_THREAD, run_script


def test_run_directory_has_every_contract_file(smoke_run):
    out, stdout = smoke_run
    for name in ["config.yaml", "run.json", "metrics.json", "metrics.md", "dataset_stats.json",
                 "candidates_train.jsonl", "candidates_val.jsonl", "candidates_test.jsonl",
                 "rankings_val.jsonl", "rankings_test.jsonl", "adapter/adapter_config.json",
                 "adapter/prompt_style.json", "retriever.pt", "top1_slots_val.png", "top1_slots_test.png",
                 "train_curves.png"]:
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
        # The LLM alone (the smoke config calibrates and fuses), its evidence, one w fitted on val.
        for key, value in sec["llm_subset"].items():
            assert sec["llm_overall"][key] == pytest.approx(value * sec["coverage"])
        assert set(sec["llm_raw_subset"]) == set(sec["llm_subset"])
        assert sec["fusion"] == metrics["val"]["fusion"]
        assert sec["calibration"]["method"] == "permuted" and list(sec["calibration"]["prior"]) == ["20"]
        assert sum(sec["calibration"]["prior"]["20"]) == pytest.approx(0.0, abs=1e-6)
        top1 = sec["llm_top1_slots"]
        assert len(top1["counts"]) == 20 and sum(top1["counts"]) == top1["n"] == sec["n_covered"]
        assert top1["max_share"] == max(top1["counts"]) / top1["n"] and sum(top1["target_counts"]) == sec["n_covered"]
        hit = sec["llm_top1_hit_non_top1"]
        assert hit["n"] <= sec["n_covered"] and hit["chance"] == pytest.approx(1 / 19) and 0.0 <= hit["share"] <= 1.0
        boot = sec["bootstrap"]
        assert boot["n"] == sec["n_covered"] and boot["metric"] == "NDCG@10"
        for name, key in (("final_minus_retriever", "subset"), ("llm_minus_retriever", "llm_subset"), ("llm_raw_minus_retriever", "llm_raw_subset")):
            b = boot[name]
            assert b["mean"] == pytest.approx(sec[key]["NDCG@10"] - sec["retriever_subset"]["NDCG@10"])
            assert b["ci_low"] <= b["mean"] + 1e-12 and b["mean"] <= b["ci_high"] + 1e-12
    fusion = metrics["val"]["fusion"]
    assert list(fusion["grid"]) == [str(w) for w in [0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0]]
    assert fusion["grid"][str(fusion["w"])] == max(fusion["grid"].values()) == metrics["val"]["subset"]["NDCG@10"]


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
        for key, section in (("scores", "subset"), ("llm_scores", "llm_subset"), ("llm_raw_scores", "llm_raw_subset")):
            recomputed = metrics_from_ranks([candidate_rank(r[key], r["candidates"], r["target"]) for r in ranks], [1, 5, 10, 20])
            assert recomputed == pytest.approx(metrics[split][section]), key
        # final = z(LLM calibrated) + w * z(retriever score), w the one fitted on val
        w = metrics[split]["fusion"]["w"]
        for c, r in zip(covered, ranks):
            assert r["scores"] == pytest.approx(fuse(r["llm_scores"], c["scores"], w))


def test_fixed_seed_gives_identical_candidates_rankings_and_metrics(smoke_run, tmp_path):
    out, _ = smoke_run
    again = tmp_path / "again"
    proc = run_script("scripts/run_experiment.py", "--config", "configs/experiments/smoke.yaml", "--out", str(again), env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ["candidates_val.jsonl", "candidates_test.jsonl", "rankings_val.jsonl", "rankings_test.jsonl", "metrics.json"]:
        assert (again / name).read_bytes() == (out / name).read_bytes(), name
