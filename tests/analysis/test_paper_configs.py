"""The paper recipes (configs/paper/) hold LlamaRec's settings, and --dry-run counts what a run costs
with the code the run uses, consistently."""
import importlib.util
import json
import math
from pathlib import Path

import pytest

from pipeline.config import load_config
from tests.helpers.scripts import REPO

PAPER = sorted((REPO / "configs" / "paper").glob("*.yaml"))
# (data.dataset, data.category) -> (train batch, retriever max_len): LlamaRec's per-dataset settings.
PER_DATASET = {("ml-latest-small", None): (16, 200), ("amazon", "Beauty"): (12, 50), ("amazon", "Video_Games"): (12, 50)}
MODELS = {"Qwen/Qwen2.5-1.5B-Instruct": False, "Qwen/Qwen2.5-7B-Instruct": True}  # hub id -> load_in_4bit


def script_main(name: str):
    """main() of scripts/<name>.py, imported by path (scripts/ is not a package), run in-process."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_one_recipe_per_dataset_and_model():
    got = set()
    for path in PAPER:
        cfg = load_config(path)
        got.add((cfg.data.dataset, cfg.data.category, cfg.reranker.model))
    assert got == {(d, c, m) for d, c in PER_DATASET for m in MODELS}, got
    assert len(PAPER) == len(got)  # no duplicate recipe


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_recipe_has_llamarec_settings(path):
    cfg = load_config(path)
    r = cfg.reranker
    batch, max_len = PER_DATASET[(cfg.data.dataset, cfg.data.category)]
    assert r.load_in_4bit is MODELS[r.model]
    assert (r.train_batch_size, cfg.retriever.max_len) == (batch, max_len)
    # every prefix, 19 random negatives
    assert r.max_train_samples is None and r.train_max_prefixes_per_user is None and r.train_min_history == 1
    assert (r.train_candidates, r.train_negatives) == (20, "random")
    assert (r.learning_rate, r.num_epochs, r.eval_steps, r.patience) == (1e-4, 1.0, 100, 20)
    assert (r.title_max_tokens, r.max_prompt_tokens, r.max_history) == (32, 1536, 20)
    assert (r.lora_r, r.lora_alpha, r.lora_dropout, list(r.lora_target_modules)) == (8, 32, 0.05, ["q_proj", "v_proj"])
    assert r.lora_layers is None and r.label_scheme == "letters" and r.loss == "vocab"
    # LlamaRec's train script enables checkpointing (and prepare_model_for_kbit_training defaults to it): without it a
    # 7B's activations at batch 12-16 of ~600-1,000-token prompts need tens of GB
    assert r.gradient_checkpointing is True
    assert r.val_max_users is None and r.best_by == "retriever_order" and r.calibration == "none" and not r.fusion
    assert (cfg.retriever.model, cfg.retriever.top_k) == ("lrurec", 20)
    # data.path: relative (runs from the repo root), the folder the header tells to fill
    assert cfg.data.path and not Path(cfg.data.path).is_absolute() and cfg.data.path.startswith("data/")


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_header_gives_run_and_dry_run_commands_and_data_files(path):
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    rel = path.relative_to(REPO).as_posix()
    assert f"python scripts/run_experiment.py --config {rel} --out" in header
    assert f"--config {rel} --out runs/dry_{path.stem} --dry-run" in header
    cfg = load_config(path)
    files = ["ratings.csv", "movies.csv"] if cfg.data.dataset == "ml-latest-small" else [
        f"ratings_{cfg.data.category}.csv", f"meta_{cfg.data.category}.json.gz"
    ]
    for name in files:
        assert f"{cfg.data.path}/{name}" in header or name in header, f"{rel}: header does not name {name}"
    assert "NOT given here" in header  # no invented cost figures for data that is not on this machine


def test_dry_run_on_a_paper_recipe_counts_consistently(tmp_path, capsys, monkeypatch):
    """The 1.5B MovieLens recipe on a slice of the bundled ML-100K: the printed figures and dry_run.json
    agree, and the steps follow from the prompt count and batch size."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the Qwen hub tokenizer is not loaded: the bundled Qwen2 one stands in
    main = script_main("run_experiment")

    out = tmp_path / "dry"
    cfg_path = REPO / "configs" / "paper" / "ml-latest-small_qwen2.5-1.5b.yaml"
    main(["--config", str(cfg_path), "--out", str(out), "--dry-run", "--dry-run-sample", "0",
          "--set", "data.dataset=ml-100k", "--set", "data.path=", "--set", "data.max_users=30"])
    printed = capsys.readouterr().out
    r = json.loads((out / "dry_run.json").read_text())
    assert sorted(p.name for p in out.iterdir()) == ["dry_run.json"]  # a dry run writes nothing else
    t, d = r["training"], r["dataset"]
    assert d["users"] > 0 and d["items"] > 0
    assert t["prompts"] > 0 and t["tokenized_prompts"] == t["prompts"] and t["tokens_exact"]
    tp = t["tokens_per_prompt"]
    assert 0 < tp["p50"] <= tp["p95"] <= tp["max"] <= t["max_prompt_tokens"] + 2  # + the answer letter and end of turn
    assert tp["mean"] * t["prompts"] == pytest.approx(t["tokens_per_epoch"], abs=t["prompts"] * 0.05)
    assert t["batch_size"] == 16 and t["epochs"] == 1.0
    assert t["optimizer_steps"] == math.ceil(t["prompts"] / t["batch_size"]) * 1
    assert r["validation"]["max_validations"] == math.ceil(t["optimizer_steps"] / 100)
    # every prefix: one prompt per train item after the first, per user (train = all but the last two items)
    from pipeline.data import load_dataset

    ds = load_dataset(load_config(cfg_path, ["data.dataset=ml-100k", "data.path=", "data.max_users=30"]).data)
    assert t["prompts"] == sum(len(ds.train_sequence(u)) - 1 for u in range(ds.n_users))
    assert r["tokenizer"]["name"] == "tiny-qwen2" and r["tokenizer"]["exact"] and "bundled Qwen2 tokenizer" in printed
    assert f"training prompts: {t['prompts']:,}" in printed and f"optimizer steps: {t['optimizer_steps']:,}" in printed
    assert r["ranking"]["test"]["prompts"] is None and r["ranking"]["test"]["max_prompts"] == d["users"]  # no retriever ran


def test_dry_run_sample_and_unknown_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from pipeline.errors import PipelineError
    main = script_main("run_experiment")

    smoke = REPO / "configs" / "experiments" / "smoke.yaml"
    main(["--config", str(smoke), "--out", str(tmp_path / "s"), "--dry-run", "--dry-run-sample", "5"])
    r = json.loads((tmp_path / "s" / "dry_run.json").read_text())
    t = r["training"]
    assert t["tokenized_prompts"] == 5 < t["prompts"] == 32 and not t["tokens_exact"]
    assert "a seeded sample of 5 of 32 prompts" in capsys.readouterr().out
    # a non-Qwen hub model that cannot load has no stand-in: the loader's one-line error, no output
    with pytest.raises(PipelineError, match="cannot load model 'someorg/some-model'"):
        main(["--config", str(smoke), "--out", str(tmp_path / "u"), "--dry-run", "--set", "reranker.model=someorg/some-model"])
    assert not (tmp_path / "u").exists()


def test_train_reranker_dry_run_counts_the_retriever_runs_prompts(smoke_run, tmp_path, capsys):
    """With retriever_run, val/test prompts are the covered users of its candidates files, and
    retriever negatives are read from them (exact token counts)."""
    from pipeline.candidates import candidates_path, read_rows
    main = script_main("train_reranker")

    run_dir, _ = smoke_run
    out = tmp_path / "dry"
    main(["--config", "configs/experiments/smoke.yaml", "--out", str(out), "--dry-run",
          "--set", f"retriever_run={run_dir}", "--set", "reranker.train_negatives=retriever"])
    r = json.loads((out / "dry_run.json").read_text())
    for split in ("val", "test"):
        rows = read_rows(candidates_path(run_dir, split))
        covered = sum(row["target"] in row["candidates"] for row in rows)
        assert r["ranking"][split] == {"users": len(rows), "covered_users": covered, "prompts": covered, "max_prompts": len(rows)}
    assert r["training"]["real_negatives"] and r["training"]["tokens_exact"]
    val_covered = r["ranking"]["val"]["covered_users"]
    assert r["validation"]["prompts_per_validation"] == 2 * min(8, val_covered)  # val_max_users 8, retriever order + shuffled
    assert r["calibration"]["prompts"] == 2 * min(64, val_covered)  # smoke: permuted, 2 orders, 64 users at most
    assert "note:" not in capsys.readouterr().out  # nothing approximate here
