"""Both stages in one run directory: retriever -> candidates -> LLM reranker -> metrics.

    python scripts/run_experiment.py --config configs/experiments/default.yaml --out runs/default
        [--set reranker.label_scheme=numbers ...] [--resume]

Writes to --out everything train_retriever.py and train_reranker.py write; metrics.json holds
the retriever's full-catalogue metrics and the reranker's subset/overall metrics per split.
--resume (or reranker.resume=true) continues an interrupted run in --out: finished stages are kept.
Under `accelerate launch` the main process trains the retriever while the others wait, then all
of them train and rank the reranker.
"""
from pipeline.cli import parser, run_main
from pipeline.config import load_config
from rerank.distributed import on_main
from rerank.run import finish_run, rerank_run, start_run
from retrieval.run import train_retriever


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    resume = args.resume or cfg.reranker.resume
    run = start_run(args.out, cfg, argv, resume)
    on_main(lambda: train_retriever(cfg, run, resume=resume))
    rerank_run(cfg, run, run.path, resume=resume)
    finish_run(run)


if __name__ == "__main__":
    run_main(main)
