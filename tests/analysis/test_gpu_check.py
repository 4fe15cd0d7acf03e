"""analysis/gpu_check.py (scripts/gpu_check.sh) without a GPU: a CPU-only torch skips the CUDA steps and says
no GPU ran; a CUDA build without a usable device fails at once naming the driver; on a CUDA machine a skipped
step fails the check; each step's outputs must show what it was asked to do; the stated time budget is the
sum of the step limits. The subprocess steps are faked here; `bash scripts/gpu_check.sh` runs them for real."""
import json
import re
from pathlib import Path

import pytest
import torch

from analysis import gpu_check
from tests.helpers.scripts import REPO

DRIVER_TOO_OLD = ("The NVIDIA driver on your system is too old (found version 12020). Please update your GPU driver by "
                  "downloading and installing a new version from the URL: http://www.nvidia.com/Download/index.aspx")


def _name(log: Path) -> str:
    return log.name.removesuffix(".log")  # run_step's log is <out>/<step>.log


def _no_gpu(monkeypatch, cuda_build: str | None):
    monkeypatch.setattr(torch.version, "cuda", cuda_build)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cpu_only_torch_skips_the_cuda_steps_and_says_no_gpu_ran(tmp_path, monkeypatch):
    calls = {}

    def fake_step(cmd, log, env, limit_s):
        name = _name(log)
        calls[name] = cmd
        assert env["HF_HUB_OFFLINE"] == "1" and limit_s == gpu_check.CPU_STEP_LIMIT_S[name]  # downloads nothing
        if name == "model":  # the real folder, built in this process
            result = gpu_check.build_model_folder(Path(cmd[cmd.index("--model") + 1]), on_cuda=False)
            Path(cmd[cmd.index("--result") + 1]).write_text(json.dumps(result))
        return {"status": "ok", "seconds": 0.0, "log": str(log)}

    _no_gpu(monkeypatch, None)
    monkeypatch.setattr(gpu_check, "run_step", fake_step)
    monkeypatch.setattr(gpu_check, "smoke_details", lambda run_dir: {})
    monkeypatch.setattr(gpu_check, "bench_details", lambda run_dir: {})
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert {n: s["status"] for n, s in steps.items()} == {
        "model": "ok", "smoke": "ok", "nf4": "skipped", "nf4_rank": "skipped", "export": "skipped", "benchmark": "ok"}
    assert all(steps[n]["reason"] == gpu_check.SKIP_CPU_TORCH for n in gpu_check.CUDA_STEPS)
    assert "tiny-qwen2 shape" in steps["model"]["shape"] and report["on_cuda"] is False  # the CPU stand-in, said so
    model_dir = out / "model"
    assert f"reranker.model={model_dir}" in calls["smoke"] and gpu_check.SMOKE_CONFIG in calls["smoke"]
    assert f"reranker.model={model_dir}" in calls["benchmark"] and "--no-rss-check" in calls["benchmark"]
    assert set(calls) == {"model", "smoke", "benchmark"}  # no CUDA step was started
    md = (out / "gpu_check.md").read_text()
    assert "| nf4 | skipped |" in md and md.rstrip().endswith("so this says nothing about a GPU")

    from rerank.model.sources import load_model_and_tokenizer
    from rerank.model.standins import QWEN_EOS

    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    assert type(model).__name__ == "Qwen2ForCausalLM" and tokenizer.eos_token == QWEN_EOS
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645 and tokenizer.encode("A") == [32]  # Qwen2's ids

    assert gpu_check.main(["--out", str(out)]) == 2  # a used --out is refused


@pytest.mark.parametrize("driver_file", [True, False], ids=["old_driver", "no_driver"])
def test_cuda_build_without_a_usable_device_fails_naming_the_driver(driver_file, tmp_path, monkeypatch, capsys):
    """A CUDA 13 torch on a machine whose driver is too old (or absent): is_available() is False, every
    CUDA step would be skipped; that is a failed check, not a pass, and nothing is run."""
    _no_gpu(monkeypatch, "13.0")

    def init():
        raise RuntimeError(DRIVER_TOO_OLD)

    monkeypatch.setattr(torch.cuda, "init", init)
    version = tmp_path / "version"
    if driver_file:
        version.write_text("NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n")
    monkeypatch.setattr(gpu_check, "DRIVER_VERSION_FILE", version)
    monkeypatch.setattr(gpu_check, "run_step", lambda *a: pytest.fail("a step ran without a usable device"))
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out)]) == 1
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    error = steps["cuda"]["error"]
    assert steps["cuda"]["status"] == "failed" and "built for CUDA 13.0 but no CUDA device is usable" in error
    assert "driver on your system is too old" in error
    assert ("NVIDIA driver: 535.104.05" if driver_file else "NVIDIA driver: none loaded") in error
    assert error.endswith("(README, GPU)") and "\n" not in error
    assert all(s["status"] == "skipped" for n, s in steps.items() if n != "cuda") and len(steps) == 7
    assert (out / "gpu_check.md").read_text().rstrip().endswith("FAILED: see the failed steps (and their logs)")
    assert "gpu_check: cuda: failed" in capsys.readouterr().out


def test_on_cuda_a_skipped_step_fails_the_check_and_nf4_runs_the_paper_settings(tmp_path, monkeypatch):
    """With a usable GPU every step must run: nf4 failing skips nf4_rank and export, and the check fails."""
    calls = {}

    def fake_step(cmd, log, env, limit_s):
        name = _name(log)
        calls[name] = cmd
        assert limit_s == gpu_check.STEP_LIMIT_S[name]
        if name == "model":
            Path(cmd[cmd.index("--result") + 1]).write_text(json.dumps({"shape": "Qwen2.5-0.5B shape"}))
        if name == "nf4":
            return {"status": "failed", "seconds": 1.0, "log": str(log), "error": "exit code 1: error: CUDA out of memory"}
        return {"status": "ok", "seconds": 0.0, "log": str(log)}

    monkeypatch.setattr(gpu_check, "cuda_problem", lambda: None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(gpu_check, "environment", lambda on_cuda: {
        "python": "py", "cuda": "13.0", "device": "NVIDIA H100", "driver": "580.1", "compute_capability": "9.0",
        "half": "bfloat16", "packages": {"torch": "2.13.0"}})
    monkeypatch.setattr(gpu_check, "run_step", fake_step)
    monkeypatch.setattr(gpu_check, "smoke_details", lambda run_dir: {})
    monkeypatch.setattr(gpu_check, "bench_details", lambda run_dir: {})
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out)]) == 1
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert steps["nf4"]["status"] == "failed" and "out of memory" in steps["nf4"]["error"]
    assert steps["nf4_rank"] == steps["export"] == {"status": "skipped", "reason": "step nf4 did not pass"}
    assert set(calls) == {"model", "smoke", "nf4", "benchmark"} and "--no-rss-check" not in calls["benchmark"]
    nf4 = calls["nf4"]
    assert nf4[1] == "scripts/run_experiment.py" and gpu_check.SMOKE_CONFIG in nf4  # the real path, as researchers run it
    assert {"reranker.load_in_4bit=true", "reranker.optim=paged_adamw_32bit", "reranker.gradient_checkpointing=true"} <= set(nf4)


def _run_dir(path: Path, reranker: dict, scores: dict[str, list[float]] | None = None) -> Path:
    import yaml

    path.mkdir(parents=True)
    (path / "config.yaml").write_text(yaml.safe_dump({"reranker": reranker}))
    (path / "metrics.json").write_text(json.dumps({"test": {"subset": {"NDCG@10": 0.5}, "n_covered": 2}}))
    (path / "train_summary.json").write_text(json.dumps({"global_step": 4, "validations": [{"step": 2}], "best_step": 2}))
    (path / "run.json").write_text(json.dumps({"machine": {"gpu": "H100"}}))
    (path / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    if scores is not None:
        (path / "rankings_test.jsonl").write_text("".join(json.dumps({"user": u, "scores": s, "llm_scores": s}) + "\n"
                                                          for u, s in scores.items()))
    return path


def test_a_step_passes_only_when_its_outputs_show_the_asked_path(tmp_path):
    nf4 = _run_dir(tmp_path / "nf4", dict(gpu_check.NF4_SETTINGS), {"u1": [-1.0, -2.0], "u2": [-0.5, -3.0]})
    assert gpu_check.nf4_details(nf4)["validations"] == 1
    plain = _run_dir(tmp_path / "plain", {**gpu_check.NF4_SETTINGS, "gradient_checkpointing": False})
    with pytest.raises(AssertionError, match="gradient_checkpointing"):
        gpu_check.nf4_details(plain)

    same = _run_dir(tmp_path / "rank", {}, {"u1": [-1.0, -2.0], "u2": [-0.5, -3.0 + 1e-5]})
    assert gpu_check.nf4_rank_details(same, nf4) == {"users": 2, "max_score_diff": pytest.approx(1e-5)}
    other_build = _run_dir(tmp_path / "rank2", {}, {"u1": [-1.0, -2.03], "u2": [-0.5, -3.0]})
    with pytest.raises(AssertionError, match="another model build ranked"):
        gpu_check.nf4_rank_details(other_build, nf4)

    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    (export / "export.json").write_text(json.dumps({"dtype": "bfloat16", "base_weights": "nf4_dequantized"}))
    (export / "config.yaml").write_text("reranker:\n  load_in_4bit: true\n")
    with pytest.raises(AssertionError, match="load_in_4bit True"):
        gpu_check.export_details(export)
    (export / "config.yaml").write_text("reranker:\n  load_in_4bit: false\n")
    assert gpu_check.export_details(export) == {"dtype": "bfloat16", "base_weights": "nf4_dequantized"}


def test_the_stated_budget_is_the_sum_of_the_step_limits():
    """The check stops each step at its limit, so it ends within their sum: the figure its script and the
    README state. It must fit a 10-minute call on a lent GPU machine."""
    assert gpu_check.BUDGET_S == sum(gpu_check.STEP_LIMIT_S.values()) <= 600 and gpu_check.BUDGET_S % 60 == 0
    stated = f"{gpu_check.BUDGET_S // 60} min"
    header = (REPO / "scripts" / "gpu_check.sh").read_text()
    assert re.findall(r"\b\d+ min", header) == [stated], header
    readme = (REPO / "README.md").read_text()
    gpu_line = next(line for line in readme.splitlines() if line.startswith("bash scripts/gpu_check.sh"))
    assert re.findall(r"\b\d+ min", gpu_line) == [stated], gpu_line
    assert set(gpu_check.STEP_LIMIT_S) == {"model", "smoke", *gpu_check.CUDA_STEPS, "benchmark"}


def test_run_step_reports_exit_code_and_last_line(tmp_path):
    import sys

    r = gpu_check.run_step([sys.executable, "-c", "print('first'); print('error: it broke'); raise SystemExit(2)"],
                           tmp_path / "log", {}, 60)
    assert r["status"] == "failed" and r["error"] == "exit code 2: error: it broke"
    r = gpu_check.run_step([sys.executable, "-c", "import time; time.sleep(5)"], tmp_path / "log2", {}, 1)
    assert r["status"] == "failed" and r["error"] == "timed out after 1 s"
