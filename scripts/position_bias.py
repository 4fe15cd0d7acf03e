"""Position bias of a trained reranker: top-1 accuracy by the ground truth's slot, in retriever order, shuffled, and permutation-averaged.

    python scripts/position_bias.py --run runs/default --out runs/position_bias \
        [--config configs/experiments/position_bias.yaml] [--set analysis.max_users=50 ...]

Opens the reranker run in --run (its config.yaml, adapter and candidates), ranks a seeded sample of
analysis.max_users covered users of analysis.split with analysis.position_permutations candidate
orders each (the retriever's, then seeded shuffles; one forward pass per order) and writes to --out:
config.yaml, run.json, position_bias.json, position_bias.csv, position_bias.md, position_bias.png.

The model, prompts, data and seed always come from the run (plus --set overrides, e.g.
reranker.device=cpu); --config (default: the run's own config.yaml) supplies the analysis section
and must name the same data, model and seed as the run. --resume: measure again into an --out that
already holds this analysis.
"""
from analysis.position_bias import position_bias, to_markdown, write_outputs
from analysis.run_config import analysis_config
from pipeline.cli import parser, run_main
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir
from rerank.inference.ranker import score_orders
from rerank.load_run import open_run


def main(argv=None):
    p = parser(__doc__.splitlines()[0], config_required=False)
    p.add_argument("--run", required=True, help="reranker run directory (train_reranker.py or run_experiment.py)")
    args = p.parse_args(argv)
    run = open_run(args.run, args.overrides)
    if RunDir(args.out).path.resolve() == run.path.resolve():
        raise PipelineError(f"--out {args.out} is the run directory itself: write the analysis to another directory")
    cfg = analysis_config(run, args.config, args.overrides)
    a = cfg.analysis
    rows = run.covered_rows(a.split, a.max_users)
    if not rows:
        raise PipelineError(f"run {args.run} has no covered {a.split} users to rank: use a run whose retriever covers some targets")
    out = RunDir(args.out).start(cfg, argv, resume=args.resume)
    model, tokenizer, style = run.load_model()
    print(f"position bias: {len(rows)} covered {a.split} users x {a.position_permutations} orders, model {cfg.reranker.model}")
    per_order = score_orders(
        model, tokenizer, style, rows, run.titles,
        batch_size=cfg.reranker.rank_batch_size, permutations=a.position_permutations, seed=cfg.seed,
    )
    n_slots = max(len(row["candidates"]) for row in rows)
    result = {
        "run": str(args.run),
        "split": a.split,
        "label_scheme": style.scheme.name,
        "head": run.cfg.reranker.head,
        **position_bias(rows, per_order, labels=style.scheme.for_k(n_slots)),
    }
    head = style.scheme.name if run.cfg.reranker.head == "label_tokens" else f"{run.cfg.reranker.head} head"
    title = f"Position bias: {run.path.name} ({a.split}, {head})"
    write_outputs(result, out.path, title=title)
    out.finish(source_run=str(args.run), n_users=len(rows))
    print(to_markdown(result, title))


if __name__ == "__main__":
    run_main(main)
