"""PNG plots of finished run directories: metrics per k and training/validation curves.

    python scripts/plot_run.py --run runs/default [runs/default_numbers ...] --out runs/plots

Writes <out>/<run name>/metrics_per_k.png (metrics.json: retriever vs reranker, all users and
covered subset, per split) and <out>/<run name>/training_curves.png (TensorBoard logs of the
reranker and the retriever; the JSON summaries when a run has no event files). Reads the runs
only; never writes into them.
"""
import argparse
from pathlib import Path

from analysis.plots import plot_run
from pipeline.cli import run_main
from pipeline.errors import PipelineError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", nargs="+", required=True, help="run directories to plot")
    p.add_argument("--out", required=True, help="folder for the plots (one sub-folder per run)")
    args = p.parse_args(argv)
    names = [Path(r).resolve().name for r in args.run]
    if len(set(names)) != len(names):
        raise PipelineError(f"two runs share a folder name ({', '.join(names)}): plot them with separate --out folders")
    out = Path(args.out)
    for run, name in zip(args.run, names):
        if Path(run).resolve() in (out / name).resolve().parents:
            raise PipelineError(f"--out {out} would write into run {run}: pick a folder outside the runs")
        for path in plot_run(run, out / name):
            print(path)


if __name__ == "__main__":
    run_main(main)
