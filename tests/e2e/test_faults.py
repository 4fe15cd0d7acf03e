"""Faults: runs killed with SIGKILL mid-training and mid-ranking resume with --resume and end with
exactly what an uninterrupted run writes; the pieces that make it so (the ranking progress file,
run-directory checks, checkpoints a kill cut short)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.candidates import read_rows
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir
from rerank.inference.progress import PartialRankings, partial_path
from rerank.run import last_complete_checkpoint
from tests.helpers.scripts import ONE_THREAD, REPO, run_script

SMOKE = "configs/experiments/smoke.yaml"
ENV = ONE_THREAD  # the smoke run's thread count: runs compared byte for byte


def start_script(*args: str, log: Path) -> subprocess.Popen:
    """`python scripts/...` in the background, output to `log` (a pipe could fill up and stall it)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, *args], cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=ENV)


def kill_when(proc: subprocess.Popen, ready, timeout: float = 300.0) -> None:
    """SIGKILL `proc` as soon as `ready()` is true (polled); fails if it exits or times out first."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before it could be killed"
        assert time.monotonic() < deadline, "the run never reached the point to kill it at"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL


def complete_checkpoints(run: Path) -> list[str]:
    """Checkpoints whose trainer_state.json (the Trainer's last file) is whole."""
    out = []
    for d in sorted((run / "checkpoints").glob("checkpoint-*")):
        try:
            json.loads((d / "trainer_state.json").read_text())
            out.append(d.name)
        except (OSError, ValueError):
            pass
    return out


def scored_batches(path: Path) -> int:
    """Whole batch lines in a ranking progress file (header excluded)."""
    if not path.is_file():
        return 0
    lines = path.read_bytes().split(b"\n")[:-1]
    return max(len(lines) - 1, 0)


# ----------------------------------------------------------------------------------------
# The pieces


def test_partial_rankings_keep_whole_batches_and_cut_a_torn_line(tmp_path):
    store = PartialRankings(tmp_path / "rankings_val.jsonl")
    assert store.path == partial_path(store.final) == tmp_path / "rankings_val.jsonl.partial"
    assert store.load("plan-a", 3) == {}  # creates the file with its header
    store.append([(2, [[-1.5, -0.25]]), (0, [[-3.0, 0.1], [-2.0, -1.0 / 3]])])
    with open(store.path, "ab") as f:  # a kill in the middle of the next batch's line
        f.write(b'{"batch": 1, "scores": [[-0.5, ')
    done = PartialRankings(store.final).load("plan-a", 3)
    assert done == {2: [[-1.5, -0.25]], 0: [[-3.0, 0.1], [-2.0, -1.0 / 3]]}  # floats round-trip exactly
    assert store.path.read_bytes().endswith(b"]]}\n")  # the torn tail is gone ...
    store.append([(1, [[-0.5, -0.75]])])  # ... so the next line starts on a line of its own
    assert sorted(store.load("plan-a", 3)) == [0, 1, 2]

    with pytest.raises(PipelineError, match="other prompts or ranking settings"):
        store.load("plan-b", 3)
    with pytest.raises(PipelineError, match="other prompts or ranking settings"):
        store.load("plan-a", 4)

    store.finish([{"user": "u1", "scores": [1.0]}])
    assert not store.path.exists() and json.loads(store.final.read_text()) == {"user": "u1", "scores": [1.0]}

    damaged = PartialRankings(tmp_path / "rankings_test.jsonl")
    damaged.path.write_text('{"plan": "p", "batches": 2}\nnot json\n{"batch": 0, "scores": []}\n')
    with pytest.raises(PipelineError, match="line 2 is not JSON"):
        damaged.load("p", 2)
    damaged.path.write_text('{"plan": "p", "batches": 2}\n{"batch": 7, "scores": []}\n')
    with pytest.raises(PipelineError, match="line 2 is not a scored batch"):
        damaged.load("p", 2)


def test_batchwise_ranking_equals_one_pass_and_skips_batches_on_disk(tmp_path):
    """rank_split with a progress file scores the batches of one uninterrupted pass (rank_rows),
    to the last bit, and a second call scores only the batches the file lacks."""
    from rerank.inference.rank_split import rank_split
    from rerank.model.sources import load_model_and_tokenizer
    from rerank.model.standins import TINY_QWEN2
    from rerank.prompting.labels import LETTERS
    from rerank.prompting.style import make_style
    from tests.helpers.rows import ITEMS, ROWS
    from tests.helpers.tokenizers import CACHE_DIR

    model, tok = load_model_and_tokenizer(TINY_QWEN2, cache_dir=CACHE_DIR)
    style = make_style(tok, LETTERS)
    cfg = load_config(None, ["reranker.rank_permutations=3", "reranker.rank_batch_size=2"]).reranker
    one_pass = rank_split(model, tok, style, ROWS, ITEMS, cfg, seed=5, progress=False)

    store = PartialRankings(tmp_path / "rankings_val.jsonl")
    batches = rank_split(model, tok, style, ROWS, ITEMS, cfg, seed=5, progress=False, partial=store)
    assert batches == one_pass  # 3 covered users x 3 orders = 5 batches of <= 2
    lines = store.path.read_text().splitlines()
    assert len(lines) == 1 + 5

    store.path.write_text("\n".join(lines[:3]) + "\n" + lines[3][:20])  # 2 batches whole, one torn
    passes = []
    hook = model.register_forward_pre_hook(lambda mod, args, kwargs: passes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    try:
        resumed = rank_split(model, tok, style, ROWS, ITEMS, cfg, seed=5, progress=False, partial=store)
    finally:
        hook.remove()
    assert resumed == one_pass and len(passes) == 3 and sum(passes) == 9 - 4  # only the 3 batches not on disk


def test_run_directory_refuses_a_second_fresh_run_and_another_config_on_resume(tmp_path):
    cfg = load_config(SMOKE)
    run = RunDir(tmp_path / "run").start(cfg, ["--config", SMOKE])
    run.finish()
    first = json.loads((run / "run.json").read_text())
    with pytest.raises(PipelineError, match="already holds a run: pass --resume"):
        RunDir(tmp_path / "run").start(cfg)

    # Resuming: same config (reranker.resume aside); run.json keeps its first start and lists resumes.
    resumed = RunDir(tmp_path / "run").start(load_config(SMOKE, ["reranker.resume=true"]), ["--resume"], resume=True)
    run_json = json.loads((resumed / "run.json").read_text())
    assert run_json["start"] == first["start"] and run_json["end"] is None
    assert [r["command"][-1] for r in run_json["resumes"]] == ["--resume"]
    assert (resumed / "config.yaml").read_text() == (run / "config.yaml").read_text()

    with pytest.raises(PipelineError, match=r"another config \(reranker.rank_batch_size: 8 there, 1 now\)"):
        RunDir(tmp_path / "run").start(load_config(SMOKE, ["reranker.rank_batch_size=1"]), resume=True)
    # A run made before a key existed lacks it: at its default it is the same computation, set otherwise it is not.
    stored = yaml.safe_load((run / "config.yaml").read_text())
    del stored["reranker"]["binding_mix_epochs"]
    (run / "config.yaml").write_text(yaml.safe_dump(stored, sort_keys=False))
    RunDir(tmp_path / "run").check(load_config(SMOKE), resume=True)
    with pytest.raises(PipelineError, match=r"another config \(reranker.binding_mix_epochs: None there, 2.0 now\)"):
        RunDir(tmp_path / "run").check(load_config(SMOKE, ["reranker.binding_mix_epochs=2"]), resume=True)
    # The sections only analysis scripts read may differ (a comparison keeps a variant run made before).
    RunDir(tmp_path / "run").check(load_config(SMOKE, ["probe.steps=7", "overfit.epochs=2", "analysis.split=val"]), resume=True)
    # Nothing to resume yet: --resume starts the run.
    assert (RunDir(tmp_path / "new").start(cfg, resume=True) / "config.yaml").is_file()


def test_checkpoints_a_kill_cut_short_are_deleted(tmp_path):
    ckpts = tmp_path / "checkpoints"
    for step, state in ((2, '{"global_step": 2}'), (4, '{"global_step": 4}'), (6, '{"global_st'), (8, None)):
        d = ckpts / f"checkpoint-{step}"
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"x")
        if state is not None:
            (d / "trainer_state.json").write_text(state)
    assert last_complete_checkpoint(ckpts) == str(ckpts / "checkpoint-4")
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-2", "checkpoint-4"]
    assert last_complete_checkpoint(tmp_path / "none") is None


# ----------------------------------------------------------------------------------------
# Killing real runs


def test_retriever_killed_mid_training_resumes_to_the_uninterrupted_result(tmp_path):
    """train_retriever.py SIGKILLed after its first epoch's state is saved: --resume continues
    from that epoch (not from scratch) and writes the candidates and metrics of a run never
    killed, byte for byte; the loop state is removed once the stage is finished."""
    args = ["scripts/train_retriever.py", "--config", SMOKE, "--set", "retriever.max_epochs=6", "--set", "retriever.patience=6"]
    done = tmp_path / "done"
    assert run_script(*args, "--out", str(done), env=ENV).returncode == 0
    out = tmp_path / "run"
    proc = start_script(*args, "--out", str(out), log=tmp_path / "killed.log")
    kill_when(proc, lambda: (out / "retriever_state.pt").is_file())
    assert not (out / "metrics.json").exists()  # killed mid-training

    resumed = run_script(*args, "--out", str(out), "--resume", env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "retriever: resumed after epoch" in resumed.stdout
    for name in ["candidates_train.jsonl", "candidates_val.jsonl", "candidates_test.jsonl", "metrics.json", "retriever.pt"]:
        assert (out / name).read_bytes() == (done / name).read_bytes(), name
    summaries = [json.loads((d / "retriever_summary.json").read_text()) for d in (done, out)]
    assert summaries[0]["history"] == summaries[1]["history"] and summaries[1]["epochs_run"] == 6
    assert not (out / "retriever_state.pt").exists() and not (done / "retriever_state.pt").exists()


def test_experiment_killed_mid_training_resumes_to_the_uninterrupted_result(smoke_run, tmp_path):
    """run_experiment.py on the smoke config, SIGKILLed right after its first checkpoint: --resume
    keeps the retriever, continues training from the checkpoint to the same number of steps, and
    writes byte for byte the candidates, rankings and metrics of the uninterrupted smoke run."""
    done, _ = smoke_run
    out = tmp_path / "run"
    proc = start_script("scripts/run_experiment.py", "--config", SMOKE, "--out", str(out), log=tmp_path / "killed.log")
    kill_when(proc, lambda: bool(complete_checkpoints(out)))
    assert not (out / "train_summary.json").exists() and not (out / "adapter").exists()  # killed mid-training
    killed_at = int(complete_checkpoints(out)[-1].split("-")[1])

    again = run_script("scripts/run_experiment.py", "--config", SMOKE, "--out", str(out), env=ENV)
    assert again.returncode == 2 and again.stderr.strip().splitlines() == [
        f"error: {out} already holds a run: pass --resume to continue it, or choose a fresh --out"
    ]

    resumed = run_script("scripts/run_experiment.py", "--config", SMOKE, "--out", str(out), "--resume", env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "retriever: kept the finished stage" in resumed.stdout
    summary = json.loads((out / "train_summary.json").read_text())
    assert int(summary["resumed_from"].rsplit("-", 1)[1]) >= killed_at  # a later one if the kill came after it
    assert summary["global_step"] == summary["max_steps"] == json.loads((done / "train_summary.json").read_text())["max_steps"]
    for name in ["candidates_val.jsonl", "candidates_test.jsonl", "rankings_val.jsonl", "rankings_test.jsonl", "metrics.json"]:
        assert (out / name).read_bytes() == (done / name).read_bytes(), name
    assert len(json.loads((out / "run.json").read_text())["resumes"]) == 1

    # Finished stages are kept: the trained adapter is loaded (not trained again) and ranks the
    # split whose rankings are missing to the same bytes as the in-memory model did.
    (out / "rankings_test.jsonl").unlink()
    adapter_files = {p.name: p.stat().st_mtime_ns for p in (out / "adapter").iterdir()}
    kept = run_script("scripts/run_experiment.py", "--config", SMOKE, "--out", str(out), "--resume", env=ENV)
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert "kept the trained adapter" in kept.stdout and "rankings val: kept rankings_val.jsonl" in kept.stdout
    assert "training prompts" not in kept.stdout
    assert {p.name: p.stat().st_mtime_ns for p in (out / "adapter").iterdir()} == adapter_files
    for name in ["rankings_val.jsonl", "rankings_test.jsonl", "metrics.json"]:
        assert (out / name).read_bytes() == (done / name).read_bytes(), name

    import copy

    import torch
    from safetensors.torch import load_file

    from rerank.model.adapter import load_adapter
    from rerank.model.sources import load_model_and_tokenizer
    from rerank.model.standins import TINY_QWEN2
    from tests.helpers.tokenizers import CACHE_DIR

    model = load_adapter(copy.deepcopy(load_model_and_tokenizer(TINY_QWEN2, cache_dir=CACHE_DIR)[0]), out)
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())  # trained LoRA weights
    resumed_lora, whole_lora = (load_file(str(d / "adapter" / "adapter_model.safetensors")) for d in (out, done))
    assert resumed_lora.keys() == whole_lora.keys() and all(torch.equal(resumed_lora[k], whole_lora[k]) for k in whole_lora)


def test_ranking_killed_mid_split_resumes_without_scoring_finished_batches_again(smoke_run, tmp_path):
    """rank_reranker.py (one prompt per batch, 8 candidate orders per user: ~100 batches a split),
    SIGKILLed after a few batches: --resume keeps every batch already on disk, scores only the rest,
    and writes the same bytes as an uninterrupted ranking."""
    done, _ = smoke_run
    sets = ["--set", "reranker.rank_batch_size=1", "--set", "reranker.rank_permutations=8"]
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    partial = partial_path(killed / "rankings_val.jsonl")
    proc = start_script("scripts/rank_reranker.py", "--run", str(done), "--out", str(killed), *sets, log=tmp_path / "killed.log")
    kill_when(proc, lambda: scored_batches(partial) >= 3)
    kept = scored_batches(partial)
    n_val = 8 * len([r for r in read_rows(done / "candidates_val.jsonl") if r["target"] in r["candidates"]])
    assert 3 <= kept < n_val and not (killed / "rankings_val.jsonl").exists()

    resumed = run_script("scripts/rank_reranker.py", "--run", str(done), "--out", str(killed), *sets, "--resume", env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"ranking: kept {kept} of {n_val} batches from rankings_val.jsonl.partial, {n_val - kept} to score" in resumed.stdout
    assert not partial.exists()

    uninterrupted = run_script("scripts/rank_reranker.py", "--run", str(done), "--out", str(whole), *sets, env=ENV)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    for split in ("val", "test"):
        rows = read_rows(killed / f"rankings_{split}.jsonl")
        covered = [r["user"] for r in read_rows(done / f"candidates_{split}.jsonl") if r["target"] in r["candidates"]]
        assert [r["user"] for r in rows] == covered  # every covered user once, in file order
        assert (killed / f"rankings_{split}.jsonl").read_bytes() == (whole / f"rankings_{split}.jsonl").read_bytes()
    assert (killed / "metrics.json").read_bytes() == (whole / "metrics.json").read_bytes()
