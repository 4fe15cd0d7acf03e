"""Both stages in one run directory: retriever -> candidates -> LLM reranker -> metrics.

    python scripts/run_experiment.py --config configs/experiments/default.yaml --out runs/default
        [--set reranker.label_scheme=numbers ...]

Writes to --out everything train_retriever.py and train_reranker.py write; metrics.json holds
the retriever's full-catalogue metrics and the reranker's subset/overall metrics per split.
"""
from pipeline.cli import parser, run_main
from pipeline.config import load_config
from pipeline.rundir import RunDir
from rerank.run import rerank_run
from retrieval.run import train_retriever


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run = RunDir(args.out).start(cfg, argv)
    train_retriever(cfg, run)
    rerank_run(cfg, run, run.path)
    run.finish()
    print((run / "metrics.md").read_text())


if __name__ == "__main__":
    run_main(main)
