"""Tune a retriever on validation only: the same coordinate-wise grid for every method (`analysis.tuning`).

    python scripts/tune_retriever.py --model sasrec --out runs/tune [--jobs 2] [--seeds 0 1 2] [--stages 3] [--dry-run]

Stage 1 (batch size x optimiser), stage 2 at its best (dropout x learning rate), stage 3 the winner for
the other --seeds; each point one train_retriever.py run under <out>/<model>/ (run with --resume:
finished runs are kept, unfinished ones continue). --jobs N runs N at once, one torch thread each (2
cores: 2 jobs). Writes <out>/<model>/grid.md and grid.json (validation per point, the chosen one) after
every stage. --stages 1 stops after stage 1. Stops at the first run that fails.
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from analysis import tuning
from pipeline.atomic import write_json, write_text

REPO = Path(__file__).resolve().parents[1]
MODELS = ("lrurec", "sasrec", "gru4rec", "narm", "bert4rec")


def command(model: str, point: tuning.Point, run: Path, seed: int) -> list[str]:
    sets = [x for s in [f"seed={seed}", *point.overrides()] for x in ("--set", s)]
    return [sys.executable, "scripts/train_retriever.py", "--config", tuning.config_path(model), "--out", str(run), *sets, "--resume"]


def run_all(cmds: list[list[str]], jobs: int, dry_run: bool) -> None:
    for cmd in cmds:
        print("$ " + shlex.join(cmd), flush=True)
    if dry_run or not cmds:
        return
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if jobs > 1 else None  # N jobs on N cores, no oversubscription

    def one(cmd: list[str]) -> int:
        run = Path(cmd[cmd.index("--out") + 1])
        log = run.parent / f"{run.name}.log"  # not with_suffix: point names hold dots (lr0.001)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            return subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT).returncode

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for cmd, rc in zip(cmds, pool.map(one, cmds)):
            if rc:
                raise SystemExit(f"error: exit status {rc}: {shlex.join(cmd)} (log beside its run directory)")


def pending(model: str, out: Path, points, seed: int = 0) -> list[list[str]]:
    """Commands of the points whose run has not finished (finished ones are kept as they are)."""
    cmds = []
    for p in points:
        run = tuning.run_dir(out, model, p, seed)
        if tuning.val_score(run) is None:
            cmds.append(command(model, p, run, seed))
    return cmds


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, choices=MODELS)
    p.add_argument("--out", required=True, help="directory of the grid's runs (<out>/<model>/...)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the winner (the first is the grid's)")
    p.add_argument("--stages", type=int, default=3, choices=(1, 2, 3), help="run stages up to this one")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, one torch thread each when > 1")
    p.add_argument("--dry-run", action="store_true", help="print the next stage's commands, run nothing")
    args = p.parse_args(argv)
    out, model = Path(args.out).resolve(), args.model  # absolute: the runs start in the repository
    base = tuning.base_point(model, REPO)
    stages = [("1", tuning.stage1(base))]
    chosen = None
    for stage in range(1, args.stages + 1):
        if stage == 3:
            cmds = [command(model, chosen, tuning.run_dir(out, model, chosen, s), s) for s in args.seeds[1:]
                    if tuning.val_score(tuning.run_dir(out, model, chosen, s)) is None]
        else:
            cmds = pending(model, out, stages[-1][1])
        run_all(cmds, args.jobs, args.dry_run)
        if args.dry_run and cmds:
            return
        if stage < 3:
            chosen = tuning.best_point(stages[-1][1], out, model)
            print(f"stage {stage}: best {chosen.name} (val NDCG@10 {tuning.val_score(tuning.run_dir(out, model, chosen)):.4f})", flush=True)
            if stage == 1:
                stages.append(("2", tuning.stage2(chosen)))
        table = tuning.grid_table(model, stages, out, chosen if stage >= 2 else None)
        write_text(out / model / "grid.md", table)
        write_json(out / model / "grid.json", {
            "model": model, "chosen": chosen.name if chosen and stage >= 2 else None,
            "points": {p.name: tuning.val_score(tuning.run_dir(out, model, p)) for _, pts in stages for p in pts},
            "seeds": {s: tuning.val_score(tuning.run_dir(out, model, chosen, s)) for s in args.seeds} if stage == 3 else None,
        })
        print(table, flush=True)


if __name__ == "__main__":
    main()
