"""The paper's Table 1 (all test users) and Table 3 (covered users), from run directories, with the published numbers beside ours.

    python scripts/reproduce_tables.py --runs runs/lrurec runs/sasrec runs/default --out runs/tables \
        [--split test] [--resamples 10000] [--seed 0]

--runs takes any mix of train_retriever.py, train_reranker.py and run_experiment.py run
directories (read only). Runs of one method with different seeds (the same config but `seed`;
for a reranker, its retriever's method and the same reranker settings) are one row: mean ±
sample std over the n runs (the Run column lists them as "n=3: a, b, c"; the CSVs have `n` and
`<metric> std` columns); two runs of one method with the same seed are refused.
scripts/run_table1.py runs every retriever for 3 seeds and the reranker on each LRURec seed, then
this script. Writes to --out: table1.md/.csv, table3.md/.csv, significance.json/.csv (paired
bootstrap over users of reranker - retriever, covered subset and overall, per run) and tables.md
(all of it, grouped by dataset). Nothing is written when a run cannot be read.
"""
import argparse
from pathlib import Path

from analysis.significance import CONFIDENCE, N_RESAMPLES, SEED
from analysis.tables.build import build_tables
from analysis.tables.read import SPLIT
from analysis.tables.render import write_outputs
from pipeline.cli import run_main
from pipeline.errors import PipelineError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", nargs="+", required=True, metavar="RUN_DIR", help="run directories to tabulate")
    p.add_argument("--out", required=True, help="directory for the tables (created if missing)")
    p.add_argument("--split", default=SPLIT, choices=("val", "test"), help="split to tabulate (the paper reports test)")
    p.add_argument("--resamples", type=int, default=N_RESAMPLES, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=SEED, help="bootstrap seed")
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    for run in args.runs:
        run_path = Path(run).resolve()
        if out == run_path or run_path in out.parents:
            raise PipelineError(f"--out {args.out} is inside run directory {run}: analyses never write into the runs they read; pick another directory")
    tables = build_tables(args.runs, args.split, args.resamples, args.seed, CONFIDENCE)
    texts = write_outputs(tables, args.out)
    print(texts["tables.md"])
    print(f"wrote {', '.join(texts)} to {args.out}")


if __name__ == "__main__":
    run_main(main)
