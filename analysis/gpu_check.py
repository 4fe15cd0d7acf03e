# Over 350 lines on purpose: one command (`python -m analysis.gpu_check`), its steps and their checks read top to bottom.
"""The GPU path a researcher runs, checked end to end on one machine (scripts/gpu_check.sh).

    python -m analysis.gpu_check --out runs/gpu_check

First the device. torch built for CUDA with no usable device (a driver too old for torch's CUDA, none loaded,
CUDA_VISIBLE_DEVICES hiding them) fails the check at once, naming the cause: nothing would run on a GPU. A
CPU-only torch runs the CPU steps, skips the CUDA ones and says that no GPU ran.
Then the steps, each a process of its own (the scripts as a researcher runs them) stopped at its time limit,
reported ok / failed / skipped in gpu_check.json + gpu_check.md under --out. A step passes only when its
process exits 0 and its outputs show it did what it was asked; nothing retries another way.
1. model: a random-init Qwen2ForCausalLM in Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV
   heads, intermediate 4864, tied embeddings) in the GPU's half type (rerank.models.resolve_dtype) with the
   real Qwen tokenizer, saved to <out>/model: a local folder, nothing downloaded. Without CUDA, tiny-qwen2's
   shape (2 layers, hidden 64) in fp32, so the CPU run stays short.
2. smoke: scripts/run_experiment.py on configs/experiments/smoke.yaml with reranker.model=<out>/model:
   retriever, LoRA training, ranking, metrics.
3. nf4: the same with the 7B paper recipes' settings (NF4_SETTINGS: reranker.load_in_4bit, optim
   paged_adamw_32bit, gradient checkpointing): the Trainer, a checkpoint per validation, the best adapter
   loaded back and saved, val/test ranked on the 4-bit base. CUDA only.
4. nf4_rank: scripts/rank_reranker.py on the nf4 run, which loads a fresh NF4 base + the adapter as --resume
   does: its test scores must be the run's own (within NF4_RANK_ATOL). CUDA only.
5. export: scripts/export_model.py on the nf4 run: the adapter merged into the dequantised NF4 base, a
   config.yaml with load_in_4bit false. CUDA only.
6. benchmark: scripts/benchmark.py with configs/experiments/benchmark_tiny.yaml, reranker.model=<out>/model,
   a few users and repeats.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

from pipeline.candidates import raw_scores
from pipeline.markdown import markdown_table
from pipeline.run_files import CONFIG_YAML, METRICS_JSON, RUN_JSON

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = "configs/experiments/smoke.yaml"
BENCH_CONFIG = "configs/experiments/benchmark_tiny.yaml"
# Qwen2.5-0.5B's config.json (vocab_size is its padded embedding size; the tokenizer has 151,646 tokens).
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936, max_position_embeddings=32768)
# Seconds each step may take on one GPU before it is stopped and reported failed. Set on paper (no GPU has run
# this check yet): the check ends within their sum, BUDGET_S (9 min), inside a 10-minute device session.
STEP_LIMIT_S = {"model": 60, "smoke": 120, "nf4": 150, "nf4_rank": 45, "export": 45, "benchmark": 120}
BUDGET_S = sum(STEP_LIMIT_S.values())
# Without CUDA (the tiny shape), with room for slower machines: measured here (2 cores, another job on one; 2026-12-06)
# model 9 s, smoke 13 s, benchmark 54 s, 77 s in all. The CUDA steps do not run.
CPU_STEP_LIMIT_S = {"model": 120, "smoke": 360, "benchmark": 360}
CUDA_STEPS = ("nf4", "nf4_rank", "export")
# The 7B paper recipes' training settings that only CUDA runs (configs/paper/*_qwen2.5-7b.yaml).
NF4_SETTINGS = {"load_in_4bit": True, "optim": "paged_adamw_32bit", "gradient_checkpointing": True}
# nf4_rank vs nf4's own test scores: the same build and batches give the same log-probabilities; a different build
# (fp32 norms and embeddings from training's kbit preparation) moves them by far more. Not yet calibrated on a GPU.
NF4_RANK_ATOL = 1e-3
# benchmark.py settings: a handful of users and repeats (the check is that it runs, not the figures' precision).
BENCH_ARGS = ["--users", "8", "--repeats", "2", "--warmup", "1", "--generation-repeats", "1"]
SKIP_CPU_TORCH = "CPU-only torch: nothing runs on a GPU"  # the one skip that is not a failure
DRIVER_VERSION_FILE = Path("/proc/driver/nvidia/version")  # the loaded NVIDIA kernel module's version


# ----------------------------------------------------------------------------------------
# The device


def cuda_problem() -> Optional[str]:
    """Why torch, built for CUDA, has no usable device, in one line with the fix; None when a device is
    usable or torch is CPU-only (no GPU expected)."""
    import torch

    if not torch.version.cuda or torch.cuda.is_available():
        return None
    try:
        torch.cuda.init()  # raises with the cause is_available() keeps to itself
        cause = "torch.cuda.is_available() is False"
    except Exception as e:  # torch's message is what we report: "The NVIDIA driver on your system is too old ..."
        cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    hidden = f"; CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else ""
    return (f"torch {torch.__version__} is built for CUDA {torch.version.cuda} but no CUDA device is usable ({cause}; "
            f"NVIDIA driver: {driver_version()}{hidden}): install a driver for CUDA {torch.version.cuda}, or a torch "
            "built for this machine's CUDA (README, GPU)")


def driver_version() -> str:
    try:
        line = DRIVER_VERSION_FILE.read_text().splitlines()[0]
    except (OSError, IndexError):
        return f"none loaded ({DRIVER_VERSION_FILE} is missing)"
    m = re.search(r"Kernel Module\s+(\S+)", line)
    return m.group(1) if m else line.strip()


def environment(on_cuda: bool) -> dict[str, Any]:
    import importlib.metadata

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "triton"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    env = {"python": sys.executable, "cuda": torch.version.cuda, "device": "cpu", "packages": versions}
    if on_cuda:
        from rerank.model.sources import resolve_dtype

        major, minor = torch.cuda.get_device_capability(0)
        env.update(device=torch.cuda.get_device_name(0), driver=driver_version(), compute_capability=f"{major}.{minor}",
                   half=str(resolve_dtype("auto", "cuda")).replace("torch.", ""))
    return env


# ----------------------------------------------------------------------------------------
# Step 1 (in a process of its own: `--step model`)


def build_model_folder(out: Path, on_cuda: bool) -> dict[str, Any]:
    """A random-init Qwen2 (0.5B's shape on CUDA, tiny-qwen2's on CPU) + the real Qwen tokenizer, saved to `out`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rerank.model.sources import resolve_dtype
    from rerank.model.standins import TinyQwen2Recipe, build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    if on_cuda:
        shape, name, dtype = dict(QWEN25_05B), "Qwen2.5-0.5B shape", resolve_dtype("auto", "cuda")
    else:
        r = TinyQwen2Recipe()
        shape = dict(hidden_size=r.hidden_size, intermediate_size=r.intermediate_size, num_hidden_layers=r.num_hidden_layers,
                     num_attention_heads=r.num_attention_heads, num_key_value_heads=r.num_key_value_heads,
                     tie_word_embeddings=r.tie_word_embeddings, vocab_size=len(tokenizer),
                     max_position_embeddings=r.max_position_embeddings)
        name, dtype = "tiny-qwen2 shape (CPU stand-in for the 0.5B shape, to keep the check fast)", torch.float32
    config = Qwen2Config(**shape, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the same weights on every run
        model = Qwen2ForCausalLM._from_config(config, dtype=dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"shape": name, "parameters": sum(p.numel() for p in model.parameters()), "dtype": str(dtype).replace("torch.", ""),
            "folder": str(out)}


def model_step(model_dir: str) -> dict[str, Any]:
    import torch

    return build_model_folder(Path(model_dir), torch.cuda.is_available())


# ----------------------------------------------------------------------------------------
# What each step's outputs must show


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _config(run_dir: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load((run_dir / CONFIG_YAML).read_text())


def smoke_details(run_dir: Path) -> dict[str, Any]:
    test = _json(run_dir / METRICS_JSON)["test"]
    train = _json(run_dir / "train_summary.json")
    return {"test_subset_NDCG@10": test["subset"]["NDCG@10"], "test_n_covered": test["n_covered"],
            "train_steps": train["global_step"], "train_runtime_s": train.get("train_runtime_s"),
            "gpu": _json(run_dir / RUN_JSON).get("machine", {}).get("gpu")}


def nf4_details(run_dir: Path) -> dict[str, Any]:
    """The run trained with NF4_SETTINGS, validated (checkpoints, the best loaded back) and ranked test."""
    reranker = _config(run_dir)["reranker"]
    wrong = {k: reranker.get(k) for k, v in NF4_SETTINGS.items() if reranker.get(k) != v}
    if wrong:
        raise AssertionError(f"the run's config.yaml has {wrong}, not {NF4_SETTINGS}")
    train = _json(run_dir / "train_summary.json")
    if not train["validations"] or not list((run_dir / "checkpoints").glob("checkpoint-*")):
        raise AssertionError("no validation or checkpoint: the best adapter was not loaded back")
    return {**smoke_details(run_dir), "validations": len(train["validations"]), "best_step": train["best_step"]}


def _test_scores(run_dir: Path) -> dict[str, list[float]]:
    """Per user, the model's own test scores (before calibration and fusion): what two builds must agree on."""
    rows = [json.loads(line) for line in (run_dir / "rankings_test.jsonl").read_text().splitlines() if line.strip()]
    return {row["user"]: raw_scores(row) for row in rows}


def nf4_rank_details(run_dir: Path, trained_dir: Path) -> dict[str, Any]:
    """rank_reranker.py's test scores (a fresh NF4 base + the adapter, the --resume build) against the run's own."""
    ours, theirs = _test_scores(run_dir), _test_scores(trained_dir)
    if set(ours) != set(theirs) or not ours:
        raise AssertionError(f"{len(ours)} users ranked, the run ranked {len(theirs)}")
    diff = max(abs(a - b) for u in ours for a, b in zip(ours[u], theirs[u], strict=True))
    if diff > NF4_RANK_ATOL:
        raise AssertionError(f"test scores differ from the run's by up to {diff:.3g} (> {NF4_RANK_ATOL}): another model build ranked")
    return {"users": len(ours), "max_score_diff": diff}


def export_details(out: Path) -> dict[str, Any]:
    reranker, info = _config(out)["reranker"], _json(out / "export.json")
    if reranker["load_in_4bit"] is not False or info["base_weights"] != "nf4_dequantized":
        raise AssertionError(f"exported config load_in_4bit {reranker['load_in_4bit']}, base weights {info['base_weights']}")
    if "quantization_config" in _json(out / "config.json"):
        raise AssertionError("the merged folder's config.json still holds a quantization_config")
    return {"dtype": info["dtype"], "base_weights": info["base_weights"]}


def bench_details(run_dir: Path) -> dict[str, Any]:
    result = _json(run_dir / "benchmark.json")
    return {"model": result.get("model", {}).get("name"), "device": result.get("machine", {}).get("device"),
            "figures": {name: fig.get("pass") for name, fig in result.get("figures", {}).items()}}


# ----------------------------------------------------------------------------------------
# Running the steps


def run_step(cmd: list[str], log: Path, env: dict[str, str], limit_s: int) -> dict[str, Any]:
    """Run `cmd` (from the repo root), its output to `log`; ok when it exits 0 within `limit_s`."""
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            rc: Optional[int] = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=limit_s).returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.perf_counter() - start, 1)
    if rc == 0:
        return {"status": "ok", "seconds": seconds, "log": str(log)}
    tail = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
    why = f"timed out after {limit_s} s" if rc is None else f"exit code {rc}: {tail[0][:300]}"
    return {"status": "failed", "seconds": seconds, "log": str(log), "error": why}


def check(out: Path) -> dict[str, Any]:
    """Every step; the report as a dict (also written to <out>/gpu_check.json and .md)."""
    import torch

    problem = cuda_problem()
    on_cuda = problem is None and torch.cuda.is_available()
    limits = STEP_LIMIT_S if on_cuda else CPU_STEP_LIMIT_S
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # nothing is downloaded in this check
    report: dict[str, Any] = {"environment": environment(on_cuda), "on_cuda": on_cuda, "budget_s": sum(limits.values()), "steps": {}}
    steps = report["steps"]
    print(f"gpu_check: {'CUDA' if on_cuda else 'CPU'}; each step stopped at its limit, {report['budget_s']} s in all", flush=True)

    def say(name: str) -> None:
        s = steps[name]
        extra = s.get("error") or s.get("reason") or ""
        print(f"gpu_check: {name}: {s['status']}" + (f" ({s['seconds']} s)" if "seconds" in s else "") + (f": {extra}" if extra else ""), flush=True)

    def step(name: str, cmd: list[str], details: Optional[Callable[[], dict[str, Any]]] = None, needs: tuple[str, ...] = ()) -> None:
        failed_before = [n for n in needs if steps[n]["status"] != "ok"]
        if problem:
            steps[name] = {"status": "skipped", "reason": "no usable CUDA device (step cuda failed)"}
        elif name in CUDA_STEPS and not on_cuda:
            steps[name] = {"status": "skipped", "reason": SKIP_CPU_TORCH}
        elif failed_before:
            steps[name] = {"status": "skipped", "reason": f"step {failed_before[0]} did not pass"}
        else:
            steps[name] = run_step(cmd, out / f"{name}.log", env, limits[name])
            if steps[name]["status"] == "ok" and details is not None:
                try:
                    steps[name].update(details())
                except Exception as e:  # its outputs do not show what it was asked to do: the step failed
                    steps[name].update(status="failed", error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        say(name)

    if problem:
        steps["cuda"] = {"status": "failed", "error": problem}
        say("cuda")
    py, model_dir = sys.executable, out / "model"
    model_arg = ["--set", f"reranker.model={model_dir}"]
    nf4_sets = [a for k, v in NF4_SETTINGS.items() for a in ("--set", f"reranker.{k}={json.dumps(v) if isinstance(v, bool) else v}")]
    step("model", [py, "-m", "analysis.gpu_check", "--step", "model", "--model", str(model_dir), "--result", str(out / "model.json")],
         lambda: _json(out / "model.json"))
    step("smoke", [py, "scripts/run_experiment.py", "--config", SMOKE_CONFIG, "--out", str(out / "smoke"), *model_arg],
         lambda: smoke_details(out / "smoke"), needs=("model",))
    step("nf4", [py, "scripts/run_experiment.py", "--config", SMOKE_CONFIG, "--out", str(out / "nf4"), *model_arg, *nf4_sets],
         lambda: nf4_details(out / "nf4"), needs=("model",))
    step("nf4_rank", [py, "scripts/rank_reranker.py", "--run", str(out / "nf4"), "--out", str(out / "nf4_rank")],
         lambda: nf4_rank_details(out / "nf4_rank", out / "nf4"), needs=("nf4",))
    step("export", [py, "scripts/export_model.py", "--run", str(out / "nf4"), "--out", str(out / "export")],
         lambda: export_details(out / "export"), needs=("nf4",))
    no_rss = [] if on_cuda else ["--no-rss-check"]  # the RSS cross-check's two fresh processes: CPU minutes, no news
    step("benchmark", [py, "scripts/benchmark.py", "--config", BENCH_CONFIG, "--out", str(out / "benchmark"), *model_arg,
                       *BENCH_ARGS, *no_rss], lambda: bench_details(out / "benchmark"), needs=("model",))
    # A skip passes only where no GPU is expected (a CPU-only torch); on a CUDA build every step must run.
    report["ok"] = all(s["status"] == "ok" or s.get("reason") == SKIP_CPU_TORCH for s in steps.values())
    return report


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    pk = env["packages"]
    lines = [
        f"# GPU check: {env['device']} (CUDA {env['cuda'] or 'none'}"
        + (f", driver {env['driver']}, compute capability {env['compute_capability']}, half {env['half']})" if report["on_cuda"] else ")"),
        "",
        "packages: " + ", ".join(f"{k} {v}" for k, v in pk.items() if v) + "; not installed: "
        + (", ".join(k for k, v in pk.items() if not v) or "none"),
        "",
    ]
    rows = []
    for name, s in report["steps"].items():
        details = s.get("error") or s.get("reason") or "; ".join(
            f"{k} {v}" for k, v in s.items() if k not in ("status", "seconds", "log", "folder") and v is not None
        )
        details = details.replace("|", "/")  # a table cell
        rows.append([name, s["status"], s.get("seconds", ""), details])
    lines.append(markdown_table(["step", "status", "seconds", "details"], rows, "llrl"))
    if not report["ok"]:
        verdict = "FAILED: see the failed steps (and their logs)"
    elif report["on_cuda"]:
        verdict = f"all steps passed on {env['device']}"
    else:
        verdict = "passed on CPU only: the CUDA steps were skipped (CPU-only torch), so this says nothing about a GPU"
    return "\n".join([*lines, "", verdict]) + "\n"


STEPS: dict[str, Callable[[str], dict[str, Any]]] = {"model": model_step}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for the report, the model folder and the steps' run directories (must not exist or be empty)")
    p.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # internal: one step in this process
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.step:  # a subprocess of check(): one step, its figures to --result
        Path(args.result).write_text(json.dumps(STEPS[args.step](args.model), indent=2) + "\n")
        return 0
    if not args.out:
        p.error("--out is required")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"error: {out} is not empty: choose a fresh --out or delete it", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    report = check(out)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (out / "gpu_check.md").write_text(text)
    print(text)
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
