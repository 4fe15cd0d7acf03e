"""Train a first-stage retriever and write its candidates files.

    python scripts/train_retriever.py --config configs/retrieval/lrurec_ml-100k.yaml --out runs/lrurec
        [--set retriever.max_epochs=3 ...] [--resume]

Writes to --out: config.yaml, run.json, dataset_stats.json, retriever_summary.json, retriever.pt,
candidates_{train,val,test}.jsonl, metrics.json, metrics.md, tb/ (TensorBoard); with
retriever.prefix_candidates != 0 also candidates_train_prefixes.jsonl (per-prefix hard negatives).
--resume continues a run in --out: a finished retriever is kept, an unfinished one continues from
the last epoch it finished.
"""
from pipeline.cli import parser, run_main
from pipeline.config import load_config
from pipeline.run_files import METRICS_MD
from pipeline.rundir import RunDir
from retrieval.run import train_retriever


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run = RunDir(args.out).start(cfg, argv, resume=args.resume)
    train_retriever(cfg, run, resume=args.resume)
    run.finish()
    print((run / METRICS_MD).read_text())


if __name__ == "__main__":
    run_main(main)
