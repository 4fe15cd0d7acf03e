"""The GPU path a researcher runs, checked end to end on one machine (scripts/gpu_check.sh).

    python -m analysis.gpu_check --out runs/gpu_check

Steps, each timed and reported as ok / failed / skipped (gpu_check.json + gpu_check.md in --out):
1. model: a random-init Qwen2ForCausalLM in Qwen2.5-0.5B's shape (hidden 896, 24 layers, 14 heads, 2 KV
   heads, intermediate 4864, tied embeddings) with the real Qwen tokenizer (rerank.models.
   build_qwen_tokenizer), saved to <out>/model: a local folder, nothing downloaded. Without CUDA the tiny
   stand-in's shape (tiny-qwen2: 2 layers, hidden 64) is saved instead, so the CPU run stays short.
2. smoke: scripts/run_experiment.py on configs/experiments/smoke.yaml with reranker.model=<out>/model
   (bf16 on CUDA, fp32 on CPU): retriever, LoRA training, ranking, metrics.
3. nf4: the folder loaded in NF4 (reranker.load_in_4bit, bitsandbytes) + LoRA (rerank.train.add_lora),
   one optimizer step (paged AdamW, the paper recipes' optimizer) on real training prompts. CUDA only.
4. unsloth: the folder loaded by the unsloth backend (reranker.backend: unsloth), its LoRA, one
   optimizer step. CUDA only, and only where unsloth is installed (.venv-gpu).
5. benchmark: scripts/benchmark.py with configs/experiments/benchmark_tiny.yaml, reranker.model=<out>/model,
   a few users and repeats.
Steps 2-5 each run in their own process (scripts as a researcher runs them; unsloth patches transformers
on import, so it gets a process of its own), with a time limit each.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = "configs/experiments/smoke.yaml"
BENCH_CONFIG = "configs/experiments/benchmark_tiny.yaml"
SKIP_NO_CUDA = "no CUDA device"  # printed as "<step>: skipped: no CUDA device"
# Qwen2.5-0.5B's config.json (vocab_size is its padded embedding size; the tokenizer has 151,646 tokens).
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                  num_key_value_heads=2, tie_word_embeddings=True, vocab_size=151936, max_position_embeddings=32768)
# Seconds each step may take before it is stopped and reported failed: the whole check stays < 8 min on one GPU.
STEP_LIMIT_S = {"smoke": 240, "nf4": 120, "unsloth": 180, "benchmark": 240}
# benchmark.py settings: a handful of users and repeats (the check is that it runs, not the figures' precision).
BENCH_ARGS = ["--users", "8", "--repeats", "2", "--warmup", "1", "--generation-repeats", "1"]
TRAIN_PROMPTS = 4  # prompts in the NF4 / unsloth training step


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------------
# Step 1: the model folder


def build_model_folder(out: Path, on_cuda: bool) -> dict[str, Any]:
    """A random-init Qwen2 (0.5B's shape on CUDA, tiny-qwen2's on CPU) + the real Qwen tokenizer, saved to `out`."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from rerank.models import TinyQwen2Recipe, build_qwen_tokenizer

    tokenizer = build_qwen_tokenizer()
    if on_cuda:
        shape, name, dtype = dict(QWEN25_05B), "Qwen2.5-0.5B shape", torch.bfloat16
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


# ----------------------------------------------------------------------------------------
# Steps 3 and 4: one LoRA training step (run in a subprocess: `--step nf4|unsloth`)


def training_batch(tokenizer: Any, device: str) -> dict[str, Any]:
    """TRAIN_PROMPTS training prompts of the smoke data, encoded and padded as the Trainer gets them."""
    from pipeline.config import load_config
    from pipeline.data import load_dataset
    from rerank.collate import TrainingTexts, collator_for
    from rerank.prompts import label_tokens, style_from_config
    from rerank.samples import samples_from_config

    cfg = load_config(REPO / SMOKE_CONFIG, [f"reranker.max_train_samples={TRAIN_PROMPTS}"])
    ds = load_dataset(cfg.data)
    style = style_from_config(cfg.reranker, tokenizer)
    texts = TrainingTexts(samples_from_config(ds, cfg.reranker, cfg.seed), ds.titles, tokenizer, style,
                          cfg.reranker.supervise_end_of_turn, label_tokens(tokenizer, style))
    batch = collator_for(tokenizer)([texts[i] for i in range(len(texts))])
    return {k: v.to(device) for k, v in batch.items()}


def answer_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, str]:
    """(loss, how): the training loss at the supervised positions (rerank.train.supervised_logits);
    a model whose patched forward ignores the boolean logits_to_keep (unsloth may) gets its own
    labels= loss instead, and `how` says so."""
    import torch.nn.functional as F

    from pipeline.errors import PipelineError
    from rerank.train import supervised_logits

    try:
        logits, targets = supervised_logits(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        return F.cross_entropy(logits.float(), targets), "supervised positions (rerank.train.supervised_logits)"
    except (PipelineError, TypeError, RuntimeError) as e:
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        return out.loss, f"the model's labels= loss (supervised_logits failed: {str(e).splitlines()[0][:160]})"


def train_step(model: Any, batch: dict[str, Any], optimizer: Any) -> dict[str, Any]:
    """Loss, one optimizer step, loss again: both finite, the LoRA weights received a gradient."""
    import torch

    model.train()
    bf16 = torch.autocast("cuda", dtype=torch.bfloat16)  # as the Trainer runs with bf16=True on these GPUs
    with bf16:
        loss, how = answer_loss(model, batch)
    loss.backward()
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grad_norm = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for _, p in lora if p.grad is not None))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad(), bf16:
        after, _ = answer_loss(model, batch)
    first, second = float(loss), float(after)
    if not (math.isfinite(first) and math.isfinite(second)) or grad_norm == 0.0:
        raise RuntimeError(f"training step is broken: loss {first} -> {second}, LoRA gradient norm {grad_norm}")
    return {"loss_before": round(first, 4), "loss_after": round(second, 4), "lora_grad_norm": round(grad_norm, 4),
            "trainable_parameters": sum(p.numel() for _, p in lora), "loss_path": how, "prompts": int(batch["input_ids"].shape[0]),
            "tokens": int(batch["attention_mask"].sum()), "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def step_nf4(model_dir: str) -> dict[str, Any]:
    """NF4 load (rerank.models) + LoRA (rerank.train.add_lora, as training adds it) + a paged-AdamW step."""
    import bitsandbytes as bnb

    from pipeline.config import load_config
    from rerank.models import load_model_and_tokenizer
    from rerank.train import add_lora

    rcfg = dataclasses.replace(load_config(REPO / SMOKE_CONFIG).reranker, model=model_dir, load_in_4bit=True)
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="bfloat16", device="cuda", load_in_4bit=True)
    n4 = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    if not n4:
        raise RuntimeError("load_in_4bit loaded no bitsandbytes Linear4bit layer: the model is not quantised")
    model = add_lora(model, rcfg, seed=0)
    optimizer = bnb.optim.PagedAdamW32bit([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return {"linear4bit_layers": n4, "optimizer": "bitsandbytes PagedAdamW32bit (optim paged_adamw_32bit)",
            **train_step(model, training_batch(tokenizer, "cuda"), optimizer)}


def step_unsloth(model_dir: str) -> dict[str, Any]:
    """The unsloth backend's load (rerank.models, backend unsloth) + unsloth's LoRA + an AdamW step."""
    import unsloth  # noqa: F401  (first: it patches transformers on import)
    import torch
    from unsloth import FastLanguageModel

    from pipeline.config import load_config
    from rerank.models import load_model_and_tokenizer

    rcfg = load_config(REPO / SMOKE_CONFIG).reranker
    model, tokenizer = load_model_and_tokenizer(model_dir, dtype="bfloat16", device="cuda", backend="unsloth")
    model = FastLanguageModel.get_peft_model(
        model, r=rcfg.lora_r, lora_alpha=rcfg.lora_alpha, lora_dropout=rcfg.lora_dropout,
        target_modules=list(rcfg.lora_target_modules), bias="none", use_gradient_checkpointing=False, random_state=0,
    )
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return {"unsloth": unsloth.__version__, **train_step(model, training_batch(tokenizer, "cuda"), optimizer)}


STEPS: dict[str, Callable[[str], dict[str, Any]]] = {"nf4": step_nf4, "unsloth": step_unsloth}


# ----------------------------------------------------------------------------------------
# Running the steps


def run_step(name: str, cmd: list[str], log: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run `cmd` (from the repo root), its output to `log`; ok when it exits 0 within STEP_LIMIT_S[name]."""
    start = time.perf_counter()
    with log.open("w") as f:
        try:
            proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=STEP_LIMIT_S[name])
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    seconds = round(time.perf_counter() - start, 1)
    if rc == 0:
        return {"status": "ok", "seconds": seconds, "log": str(log)}
    tail = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
    why = f"timed out after {STEP_LIMIT_S[name]} s" if rc is None else f"exit code {rc}: {tail[0][:300]}"
    return {"status": "failed", "seconds": seconds, "log": str(log), "error": why}


def smoke_details(run_dir: Path) -> dict[str, Any]:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    train = json.loads((run_dir / "train_summary.json").read_text())
    test = metrics.get("test", {})
    return {"test_subset_NDCG@10": test.get("subset", {}).get("NDCG@10"), "test_n_covered": test.get("n_covered"),
            "train_steps": train.get("global_step"), "train_runtime_s": train.get("train_runtime_s"),
            "gpu": json.loads((run_dir / "run.json").read_text()).get("machine", {}).get("gpu")}


def bench_details(run_dir: Path) -> dict[str, Any]:
    result = json.loads((run_dir / "benchmark.json").read_text())
    return {"model": result.get("model", {}).get("name"), "device": result.get("machine", {}).get("device"),
            "figures": {name: fig.get("pass") for name, fig in result.get("figures", {}).items()}}


def environment(on_cuda: bool) -> dict[str, Any]:
    import importlib.metadata

    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "unsloth", "unsloth_zoo", "xformers", "triton"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {"python": sys.executable, "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0) if on_cuda else "cpu",
            "packages": versions}


def check(out: Path) -> dict[str, Any]:
    """Every step; the report as a dict (also written to <out>/gpu_check.json and .md)."""
    on_cuda = cuda_available()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}  # nothing is downloaded in this check
    report: dict[str, Any] = {"environment": environment(on_cuda), "steps": {}}
    steps = report["steps"]

    def say(name: str) -> None:
        s = steps[name]
        extra = s.get("error") or s.get("reason") or ""
        print(f"gpu_check: {name}: {s['status']}" + (f" ({s['seconds']} s)" if "seconds" in s else "") + (f": {extra}" if extra else ""), flush=True)

    model_dir = out / "model"
    start = time.perf_counter()
    try:
        steps["model"] = {"status": "ok", **build_model_folder(model_dir, on_cuda)}
    except Exception as e:  # reported, and the steps that need the folder are skipped
        steps["model"] = {"status": "failed", "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
    steps["model"]["seconds"] = round(time.perf_counter() - start, 1)
    say("model")
    have_model = steps["model"]["status"] == "ok"
    dtype = ["--set", "reranker.dtype=bfloat16"] if on_cuda else []

    if have_model:
        steps["smoke"] = run_step("smoke", [sys.executable, "scripts/run_experiment.py", "--config", SMOKE_CONFIG, "--out",
                                            str(out / "smoke"), "--set", f"reranker.model={model_dir}", *dtype], out / "smoke.log", env)
        if steps["smoke"]["status"] == "ok":
            steps["smoke"].update(smoke_details(out / "smoke"))
    else:
        steps["smoke"] = {"status": "skipped", "reason": "no model folder (step model failed)"}
    say("smoke")

    for name in ("nf4", "unsloth"):
        if not on_cuda:
            steps[name] = {"status": "skipped", "reason": SKIP_NO_CUDA}
        elif not have_model:
            steps[name] = {"status": "skipped", "reason": "no model folder (step model failed)"}
        elif name == "unsloth" and report["environment"]["packages"]["unsloth"] is None:
            steps[name] = {"status": "skipped", "reason": "unsloth is not installed: use .venv-gpu (bash setup.sh --gpu)"}
        else:
            result = out / f"{name}.json"
            steps[name] = run_step(name, [sys.executable, "-m", "analysis.gpu_check", "--step", name, "--model", str(model_dir),
                                          "--result", str(result)], out / f"{name}.log", env)
            if steps[name]["status"] == "ok":
                steps[name].update(json.loads(result.read_text()))
        say(name)

    if have_model:
        no_rss = [] if on_cuda else ["--no-rss-check"]  # the RSS cross-check's two fresh processes: CPU minutes, no news
        steps["benchmark"] = run_step("benchmark", [sys.executable, "scripts/benchmark.py", "--config", BENCH_CONFIG, "--out",
                                                    str(out / "benchmark"), "--set", f"reranker.model={model_dir}", *dtype,
                                                    *BENCH_ARGS, *no_rss], out / "benchmark.log", env)
        if steps["benchmark"]["status"] == "ok":
            steps["benchmark"].update(bench_details(out / "benchmark"))
    else:
        steps["benchmark"] = {"status": "skipped", "reason": "no model folder (step model failed)"}
    say("benchmark")
    report["ok"] = all(s["status"] != "failed" for s in steps.values())
    return report


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    pk = env["packages"]
    lines = [
        f"# GPU check: {env['device']} (CUDA {env['cuda'] or 'none'})",
        "",
        "packages: " + ", ".join(f"{k} {v}" for k, v in pk.items() if v) + "; not installed: "
        + (", ".join(k for k, v in pk.items() if not v) or "none"),
        "",
        "| step | status | seconds | details |",
        "|---|---|---:|---|",
    ]
    for name, s in report["steps"].items():
        details = s.get("error") or s.get("reason") or "; ".join(
            f"{k} {v}" for k, v in s.items() if k not in ("status", "seconds", "log", "folder") and v is not None
        )
        details = details.replace("|", "/")  # a table cell
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', '')} | {details} |")
    lines += ["", "all steps passed or were skipped" if report["ok"] else "FAILED: see the failed steps' logs"]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="folder for the report, the model folder and the steps' run directories (must not exist or be empty)")
    p.add_argument("--step", choices=sorted(STEPS), help=argparse.SUPPRESS)  # internal: one CUDA step in this process
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
