"""More than one process: `accelerate launch` with 2 CPU processes (torchrun, gloo) trains the
reranker data parallel through the Trainer and shares the ranking batches out; the adapter loads
and the rankings equal, byte for byte, one process ranking with that adapter."""
from __future__ import annotations

import copy
import json
import socket
import subprocess
import sys

from pipeline.candidates import read_rows
from tests.helpers.scripts import ONE_THREAD, REPO, run_script

SMOKE = "configs/experiments/smoke.yaml"
ENV = ONE_THREAD  # the smoke run's thread count: runs compared byte for byte


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_launch(*args: str, processes: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch` as the README shows it: --multi_gpu picks accelerate's torchrun launcher;
    with reranker.device=cpu the processes talk over gloo."""
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(free_port()), *args,
    ]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=ENV)


def test_two_cpu_processes_train_a_loadable_adapter_and_rank_like_one_process(smoke_run, tmp_path):
    done, _ = smoke_run
    two, one = tmp_path / "two", tmp_path / "one"
    # Ranking batches of 2 prompts: val (8 covered users) and test (5) need both processes.
    sets = ["--set", f"retriever_run={done}", "--set", "reranker.device=cpu", "--set", "reranker.rank_batch_size=2"]
    proc = accelerate_launch("scripts/train_reranker.py", "--config", SMOKE, "--out", str(two), *sets)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-3000:])
    assert proc.stdout.count("## val") == 1  # one process prints (and writes)

    summary = json.loads((two / "train_summary.json").read_text())
    # 32 prompts, 8 per process per step, 2 processes: 2 optimizer steps (one process would take 4).
    assert summary["n_train_samples"] == 32 and summary["global_step"] == summary["max_steps"] == 2
    assert {f.name for f in (two / "checkpoints" / "checkpoint-2").glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert json.loads((two / "run.json").read_text())["end"]

    from rerank.model.adapter import load_adapter
    from rerank.model.sources import load_model_and_tokenizer
    from rerank.model.standins import TINY_QWEN2
    from tests.helpers.tokenizers import CACHE_DIR

    model = load_adapter(copy.deepcopy(load_model_and_tokenizer(TINY_QWEN2, cache_dir=CACHE_DIR)[0]), two)
    assert any("lora_B" in name and p.abs().sum() > 0 for name, p in model.named_parameters())  # trained

    # One process ranking with the saved adapter (the same batches) writes the same bytes.
    single = run_script("scripts/rank_reranker.py", "--run", str(two), "--out", str(one), env=ENV)
    assert single.returncode == 0, single.stderr[-3000:]
    for split in ("val", "test"):
        covered = [r["user"] for r in read_rows(done / f"candidates_{split}.jsonl") if r["target"] in r["candidates"]]
        assert [r["user"] for r in read_rows(two / f"rankings_{split}.jsonl")] == covered
        assert (two / f"rankings_{split}.jsonl").read_bytes() == (one / f"rankings_{split}.jsonl").read_bytes(), split
    assert json.loads((two / "metrics.json").read_text()) == json.loads((one / "metrics.json").read_text())
