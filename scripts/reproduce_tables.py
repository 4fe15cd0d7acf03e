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
bootstrap over users of reranker - retriever, covered subset and overall, per run), convergence.md/.csv
and kept_curves.csv (how each retriever's training ended, its curve around the kept epoch),
retriever_curves.png (every retriever seed's validation NDCG@10 and training loss per epoch; one PNG per
dataset when there are several) and tables.md (all of it, grouped by dataset). Nothing is written when a run cannot be read.
"""
import argparse
import re
from pathlib import Path

from analysis.significance import CONFIDENCE, N_RESAMPLES, SEED
from analysis.plots import retriever_curves_figure
from analysis.tables.build import build_tables
from analysis.tables.convergence import seed_summaries
from analysis.tables.read import SPLIT
from analysis.tables.render import write_outputs
from pipeline.cli import run_main
from pipeline.errors import PipelineError
from pipeline.plotting import save_png


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
    pngs = []
    for g in tables.groups:  # each dataset's retriever curves, when it has any
        runs = seed_summaries(g)
        if runs:
            name = "retriever_curves.png" if len(tables.groups) == 1 else f"retriever_curves_{re.sub(r'[^A-Za-z0-9.-]+', '_', g.label).strip('_')}.png"
            pngs.append(save_png(retriever_curves_figure(runs, g.label), Path(args.out) / name).name)
    print(texts["tables.md"])
    print(f"wrote {', '.join([*texts, *pngs])} to {args.out}")


if __name__ == "__main__":
    run_main(main)
