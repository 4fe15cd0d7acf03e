"""Rank the val/test candidates with a trained reranker run's adapter (no training).

    python scripts/rank_reranker.py --run runs/smoke --out runs/smoke_ranked \
        [--set reranker.rank_batch_size=32 --set reranker.rank_permutations=4 ...] [--resume]
    accelerate launch --multi_gpu --num_processes 4 scripts/rank_reranker.py --run ... --out ...

The config is RUN/config.yaml with the --set overrides (ranking settings: rank_batch_size,
rank_permutations, calibration, fusion, device); the candidates are those the run reranked. Writes to --out:
config.yaml, run.json, rankings_val.jsonl, rankings_test.jsonl, metrics.json, metrics.md, top1_slots_<split>.png.
--resume continues an interrupted ranking from rankings_<split>.jsonl.partial.
"""
from pipeline.cli import parser, run_main
from pipeline.errors import PipelineError
from rerank.load_run import open_run
from rerank.run import finish_run, rank_run, start_run


def main(argv=None):
    p = parser(__doc__.splitlines()[0], config_required=False)
    p.add_argument("--run", required=True, help="reranker run directory (train_reranker.py / run_experiment.py) whose adapter ranks")
    args = p.parse_args(argv)
    if args.config:
        raise PipelineError("rank_reranker.py ranks with RUN/config.yaml: drop --config and change ranking settings with --set")
    source = open_run(args.run, args.overrides)
    run = start_run(args.out, source.cfg, argv, args.resume)
    rank_run(source.cfg, run, source, resume=args.resume)
    finish_run(run)


if __name__ == "__main__":
    run_main(main)
