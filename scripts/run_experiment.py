"""Both stages in one run directory: retriever -> candidates -> LLM reranker -> metrics.

    python scripts/run_experiment.py --config configs/experiments/default.yaml --out runs/default
        [--set reranker.label_scheme=numbers ...] [--resume]

Writes to --out everything train_retriever.py and train_reranker.py write; metrics.json holds
the retriever's full-catalogue metrics and the reranker's subset/overall metrics per split.
--resume (or reranker.resume=true) continues an interrupted run in --out: finished stages are kept.
--dry-run counts what the reranker stage would cost (users, items, training prompts, tokens,
optimizer steps) without training the retriever or loading a model; writes <out>/dry_run.json.
Under `accelerate launch` the main process trains the retriever while the others wait, then all
of them train and rank the reranker.
"""
from pathlib import Path

from pipeline.candidates import candidates_path
from pipeline.cli import parser, run_main
from pipeline.config import load_config
from pipeline.data import SPLITS
from pipeline.distributed import on_main
from rerank import dry_run
from rerank.preflight import check_before_retriever
from rerank.run import finish_run, rerank_run, start_run
from retrieval.run import train_retriever


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    dry_run.add_arguments(p)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.dry_run:
        # The retriever is not trained here; an --out holding its candidates (a run to resume) is read.
        ran = all(candidates_path(args.out, split).is_file() for split in SPLITS)
        dry_run.dry_run(cfg, args.out, Path(args.out) if ran else None, args.dry_run_sample, argv)
        return
    check_before_retriever(cfg)  # a reranker setting that cannot rank the retriever's candidates stops it here
    resume = args.resume or cfg.reranker.resume
    run = start_run(args.out, cfg, argv, resume)
    on_main(lambda: train_retriever(cfg, run, resume=resume))
    rerank_run(cfg, run, run.path, resume=resume)
    finish_run(run)


if __name__ == "__main__":
    run_main(main)
