"""analysis/gpu_check.py (scripts/gpu_check.sh) without a GPU: the CUDA-only steps say they are skipped,
the model folder is a loadable Qwen2 with the real Qwen tokenizer, and the scripts get that folder.
The subprocess steps are faked here; `bash scripts/gpu_check.sh` runs them for real (~3 min on 2 cores)."""
import json


from analysis import gpu_check


def test_cpu_check_skips_the_cuda_steps_and_passes_the_folder_on(tmp_path, monkeypatch):
    calls = {}

    def fake_step(name, cmd, log, env):
        calls[name] = cmd
        assert env["HF_HUB_OFFLINE"] == "1"  # the check downloads nothing
        return {"status": "ok", "seconds": 0.0, "log": str(log)}

    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)
    monkeypatch.setattr(gpu_check, "run_step", fake_step)
    monkeypatch.setattr(gpu_check, "smoke_details", lambda run_dir: {})
    monkeypatch.setattr(gpu_check, "bench_details", lambda run_dir: {})
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out)]) == 0
    report = json.loads((out / "gpu_check.json").read_text())
    steps = report["steps"]
    assert [steps[n]["status"] for n in ("model", "smoke", "nf4", "unsloth", "benchmark")] == ["ok", "ok", "skipped", "skipped", "ok"]
    assert steps["nf4"]["reason"] == steps["unsloth"]["reason"] == "no CUDA device"
    assert "tiny-qwen2 shape" in steps["model"]["shape"]  # the CPU stand-in, said so
    model_dir = out / "model"
    assert f"reranker.model={model_dir}" in calls["smoke"] and gpu_check.SMOKE_CONFIG in calls["smoke"]
    assert f"reranker.model={model_dir}" in calls["benchmark"] and "--no-rss-check" in calls["benchmark"]
    assert set(calls) == {"smoke", "benchmark"}  # no CUDA step was started
    assert "| nf4 | skipped |" in (out / "gpu_check.md").read_text()

    from rerank.models import QWEN_EOS, load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(str(model_dir))
    assert type(model).__name__ == "Qwen2ForCausalLM" and tokenizer.eos_token == QWEN_EOS
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == 151645 and tokenizer.encode("A") == [32]  # Qwen2's ids

    assert gpu_check.main(["--out", str(out)]) == 2  # a used --out is refused


def test_a_failed_step_fails_the_check(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)
    monkeypatch.setattr(gpu_check, "build_model_folder", lambda out, on_cuda: (_ for _ in ()).throw(OSError("disk full")))
    out = tmp_path / "check"
    assert gpu_check.main(["--out", str(out)]) == 1
    steps = json.loads((out / "gpu_check.json").read_text())["steps"]
    assert steps["model"]["status"] == "failed" and "disk full" in steps["model"]["error"]
    assert steps["smoke"]["status"] == steps["benchmark"]["status"] == "skipped"


def test_run_step_reports_exit_code_and_last_line(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(gpu_check.STEP_LIMIT_S, "smoke", 60)
    r = gpu_check.run_step("smoke", [sys.executable, "-c", "print('first'); print('error: it broke'); raise SystemExit(2)"],
                           tmp_path / "log", {})
    assert r["status"] == "failed" and r["error"] == "exit code 2: error: it broke"
    monkeypatch.setitem(gpu_check.STEP_LIMIT_S, "smoke", 1)
    r = gpu_check.run_step("smoke", [sys.executable, "-c", "import time; time.sleep(5)"], tmp_path / "log2", {})
    assert r["status"] == "failed" and r["error"] == "timed out after 1 s"
