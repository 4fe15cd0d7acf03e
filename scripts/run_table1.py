"""Table 1 end to end: every retriever for several seeds, the reranker on each LRURec seed, then the tables.

    python scripts/run_table1.py --out runs/table1 [--seeds 0 1 2] \
        [--retrievers pop gru4rec narm bert4rec sasrec lrurec] \
        [--reranker-config configs/experiments/default.yaml] [--reranker-seeds 0 1 2 | --no-reranker] [--dry-run]

A thin driver over the other scripts, one process per run, each run an ordinary run directory
under --out (a rerun continues: every command gets --resume, which keeps finished runs):

    <out>/<model>_seed<k>   train_retriever.py --config configs/retrieval/<model>_ml-100k.yaml --set seed=<k>
                            (pop has no randomness: one run, <out>/pop)
    <out>/rerank_lrurec_seed<k>
                            train_reranker.py --config <reranker config> --set retriever_run=<out>/lrurec_seed<k>
                            --set seed=<k>; the LRURec runs then also write the per-prefix candidates the
                            reranker config asks for (its retriever.prefix_candidates)
    <out>/tables            reproduce_tables.py over all of them: mean ± std (n) per method

A run whose run.json says it finished (an end time, no error) is not started again, so its run.json
keeps the start and end of the one process that made it (the wall time the tables report); an
unfinished one is continued with --resume. --dry-run prints the commands without running them.
Stops at the first command that fails.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from pipeline.config import load_config
from pipeline.run_files import RUN_JSON

REPO = Path(__file__).resolve().parents[1]
RETRIEVERS = ("pop", "gru4rec", "narm", "bert4rec", "sasrec", "lrurec")
SEEDLESS = ("pop",)  # deterministic: one run, whatever the seeds
RERANKER_CONFIG = "configs/experiments/default.yaml"


def commands(out: str, seeds: list[int], retrievers: list[str], reranker_config: str | None, reranker_seeds: list[int]) -> list[list[str]]:
    """The scripts' command lines, in the order they run (paths relative to the repository)."""
    py = sys.executable
    out_dir = Path(out)
    prefix_candidates = None
    if reranker_config:
        if "lrurec" not in retrievers:
            raise SystemExit("error: the reranker reranks the LRURec runs: keep lrurec in --retrievers or pass --no-reranker")
        missing = sorted(set(reranker_seeds) - set(seeds))
        if missing:
            raise SystemExit(f"error: --reranker-seeds {missing} have no LRURec run: each must be one of --seeds {seeds}")
        prefix_candidates = load_config(REPO / reranker_config).retriever.prefix_candidates
    cmds, runs = [], []
    for model in retrievers:
        for seed in seeds[:1] if model in SEEDLESS else seeds:
            run = out_dir / (model if model in SEEDLESS else f"{model}_seed{seed}")
            cmd = [py, "scripts/train_retriever.py", "--config", f"configs/retrieval/{model}_ml-100k.yaml", "--out", str(run),
                   "--set", f"seed={seed}", "--resume"]
            if model == "lrurec" and reranker_config and prefix_candidates != 0:
                value = "null" if prefix_candidates is None else str(prefix_candidates)
                cmd += ["--set", f"retriever.prefix_candidates={value}"]
            cmds.append(cmd)
            runs.append(run)
    if reranker_config:
        for seed in reranker_seeds:
            run = out_dir / f"rerank_lrurec_seed{seed}"
            cmds.append([py, "scripts/train_reranker.py", "--config", reranker_config, "--out", str(run),
                         "--set", f"retriever_run={out_dir / f'lrurec_seed{seed}'}", "--set", f"seed={seed}", "--resume"])
            runs.append(run)
    cmds.append([py, "scripts/reproduce_tables.py", "--runs", *map(str, runs), "--out", str(out_dir / "tables")])
    return cmds


def finished(run_dir: Path) -> bool:
    """True when `run_dir`'s run.json records a finished run (RunDir stamps `end` only on success)."""
    try:
        run = json.loads((run_dir / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    return bool(run.get("end")) and not run.get("error")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="directory for every run and the tables")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of each retriever (default 0 1 2)")
    p.add_argument("--retrievers", nargs="+", default=list(RETRIEVERS), choices=RETRIEVERS, help="retriever configs to run")
    p.add_argument("--reranker-config", default=RERANKER_CONFIG, help="config of the reranker on the LRURec runs")
    p.add_argument("--reranker-seeds", type=int, nargs="+", help="LRURec seeds to rerank (default: all --seeds)")
    p.add_argument("--no-reranker", action="store_true", help="retrievers and tables only")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    reranker_config = None if args.no_reranker else args.reranker_config
    cmds = commands(args.out, args.seeds, args.retrievers, reranker_config, args.reranker_seeds or args.seeds)
    for cmd in cmds:
        run_dir = Path(cmd[cmd.index("--out") + 1])
        if cmd[1] != "scripts/reproduce_tables.py" and finished(REPO / run_dir):
            print(f"kept finished run {run_dir}", flush=True)
            continue
        print("$ " + shlex.join(cmd), flush=True)
        if args.dry_run:
            continue
        proc = subprocess.run(cmd, cwd=REPO)
        if proc.returncode:
            raise SystemExit(f"error: exit status {proc.returncode}: {shlex.join(cmd)}")


if __name__ == "__main__":
    main()
