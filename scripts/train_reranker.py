"""Train the LLM reranker on a retriever run's candidates and rank its val/test users.

    python scripts/train_reranker.py --config configs/experiments/default.yaml --out runs/rerank \
        --set retriever_run=runs/lrurec_ml-100k [--set reranker.label_scheme=numbers ...]

Writes to --out: config.yaml, run.json, adapter/ (peft LoRA adapter + prompt_style.json),
checkpoints/, tensorboard/, train_summary.json, rankings_val.jsonl, rankings_test.jsonl,
metrics.json (retriever, retriever_subset, subset, overall per split), metrics.md.
"""
from pipeline.cli import parser, run_main
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir
from rerank.run import rerank_run


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not cfg.retriever_run:
        raise PipelineError("retriever_run is not set: pass --set retriever_run=RUN_DIR of scripts/train_retriever.py")
    run = RunDir(args.out).start(cfg, argv)
    rerank_run(cfg, run, cfg.retriever_run)
    run.finish()
    print((run / "metrics.md").read_text())


if __name__ == "__main__":
    run_main(main)
