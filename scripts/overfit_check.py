"""The learnability check: the reranker recipe trained on a handful of its own training prompts.

    python scripts/overfit_check.py --config configs/experiments/overfit.yaml --out runs/overfit \
        [--set retriever_run=runs/default] [--set overfit.modes=[redrawn]] [--set reranker.label_position=after ...]

Trains cfg.overfit.n_prompts training prompts for cfg.overfit.epochs epochs, once with candidate
orders re-drawn every epoch and once with fixed orders (`rerank.overfit.run_check`), and writes to --out:
config.yaml, run.json, overfit.json (per epoch: training loss, top-1 on those prompts in fresh
orders), overfit.png, and each mode's training under <mode>/. Retriever negatives (train_negatives
mix/retriever) come from retriever_run's candidates; without retriever_run the retriever is trained
into --out first.
"""
from pipeline.cli import parser, run_main
from pipeline.config import load_config
from pipeline.rundir import RunDir
from rerank.overfit import RESULT_FILE, run_check
from rerank.training.samples import USES_RETRIEVER
from retrieval.run import train_retriever


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run = RunDir(args.out).start(cfg, argv, resume=args.resume)
    candidates = cfg.retriever_run
    if candidates is None and cfg.reranker.train_negatives in USES_RETRIEVER:
        train_retriever(cfg, run, resume=args.resume)
        candidates = str(run.path)
    run_check(cfg, run.path, candidates)
    run.finish()
    print(f"overfit check: {run / RESULT_FILE}")


if __name__ == "__main__":
    run_main(main)
