"""Train the LLM reranker on a retriever run's candidates and rank its val/test users.

    python scripts/train_reranker.py --config configs/experiments/default.yaml --out runs/rerank \
        --set retriever_run=runs/lrurec_ml-100k [--set reranker.label_scheme=numbers ...] [--resume]
    accelerate launch --multi_gpu --num_processes 4 scripts/train_reranker.py ...   # data parallel

Writes to --out: config.yaml, run.json, adapter/ (peft LoRA adapter + prompt_style.json),
checkpoints/, tensorboard/, train_summary.json, rankings_val.jsonl, rankings_test.jsonl,
metrics.json (retriever, retriever_subset, subset, overall per split), metrics.md.
--resume (or reranker.resume=true) continues an interrupted run in --out: a trained adapter is
kept, training continues from its last checkpoint, ranking from rankings_<split>.jsonl.partial.
--dry-run counts what the run would cost (users, items, training prompts, tokens, optimizer steps,
val/test prompts from retriever_run's candidates) without loading a model; writes <out>/dry_run.json.
"""
from pipeline.cli import parser, run_main
from pipeline.config import load_config
from pipeline.errors import PipelineError
from rerank import dry_run
from rerank.run import finish_run, rerank_run, start_run


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    dry_run.add_arguments(p)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if not cfg.retriever_run:
        raise PipelineError("retriever_run is not set: pass --set retriever_run=RUN_DIR of scripts/train_retriever.py")
    if args.dry_run:
        dry_run.dry_run(cfg, args.out, cfg.retriever_run, args.dry_run_sample, argv)
        return
    resume = args.resume or cfg.reranker.resume
    run = start_run(args.out, cfg, argv, resume)
    rerank_run(cfg, run, cfg.retriever_run, resume=resume)
    finish_run(run)


if __name__ == "__main__":
    run_main(main)
