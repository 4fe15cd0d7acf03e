"""Position bias of a trained reranker: top-1 accuracy by the ground truth's slot, in retriever order, shuffled, and permutation-averaged.

    python scripts/position_bias.py --run runs/default --out runs/position_bias \
        [--config configs/experiments/position_bias.yaml] [--set analysis.max_users=50 ...]

Opens the reranker run in --run (its config.yaml, adapter and candidates), ranks a seeded sample of
analysis.max_users covered users of analysis.split with analysis.position_permutations candidate
orders each (the retriever's, then seeded shuffles; one forward pass per order) and writes to --out:
config.yaml, run.json, position_bias.json, position_bias.csv, position_bias.md, position_bias.png.

The model, prompts, data and seed always come from the run (plus --set overrides, e.g.
reranker.device=cpu); --config (default: the run's own config.yaml) supplies the analysis section
and must name the same data, model and seed as the run.
"""
import dataclasses

from analysis.position_bias import position_bias, to_markdown, write_outputs
from pipeline.cli import parser, run_main
from pipeline.config import load_config, to_dict
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir
from rerank.load_run import open_run
from rerank.ranker import score_orders

# What decides the numbers measured; a --config that disagrees on any of these describes another run.
SAME_AS_RUN = ("seed", "data", "reranker.model", "reranker.label_scheme", "reranker.custom_labels")


def _leaves(d: dict, prefix: str = "") -> dict:
    """Flattened config: dotted key -> value."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def main(argv=None):
    p = parser(__doc__.splitlines()[0], config_required=False)
    p.add_argument("--run", required=True, help="reranker run directory (train_reranker.py or run_experiment.py)")
    args = p.parse_args(argv)
    if args.resume:
        raise PipelineError("--resume does not apply to position_bias.py (it trains nothing): drop it")
    run = open_run(args.run, args.overrides)
    if RunDir(args.out).path.resolve() == run.path.resolve():
        raise PipelineError(f"--out {args.out} is the run directory itself: write the analysis to another directory")
    cfg = run.cfg
    if args.config:
        given = load_config(args.config, args.overrides)
        mine, theirs = _leaves(to_dict(given)), _leaves(to_dict(run.cfg))
        for key in sorted(set(mine) | set(theirs)):
            if any(key == k or key.startswith(k + ".") for k in SAME_AS_RUN) and mine.get(key) != theirs.get(key):
                raise PipelineError(
                    f"--config {args.config} sets {key} = {mine.get(key)!r} but run {args.run} was made with "
                    f"{theirs.get(key)!r}: pass the run's own config (or none) or a matching one"
                )
        cfg = dataclasses.replace(run.cfg, analysis=given.analysis)
    a = cfg.analysis
    rows = run.covered_rows(a.split, a.max_users)
    if not rows:
        raise PipelineError(f"run {args.run} has no covered {a.split} users to rank: use a run whose retriever covers some targets")
    out = RunDir(args.out).start(cfg, argv)
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
        **position_bias(rows, per_order, labels=style.scheme.for_k(n_slots)),
    }
    title = f"Position bias: {run.path.name} ({a.split}, {style.scheme.name})"
    write_outputs(result, out.path, title=title)
    out.finish(source_run=str(args.run), n_users=len(rows))
    print(to_markdown(result, title))


if __name__ == "__main__":
    run_main(main)
