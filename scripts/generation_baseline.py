"""Generation-based ranking vs the one-pass ranker on the same users (the paper's Figure 3 contrast).

    python scripts/generation_baseline.py --run runs/default --out runs/generation \
        [--config configs/experiments/generation_baseline.yaml] [--set analysis.max_users=16 ...]

--run: a reranker run directory (train_reranker.py / run_experiment.py); its model, adapter, prompt
style, data and candidates are used as trained. --config: where the analysis section comes from
(default: the run's own config.yaml); its data, seed and reranker model must be the run's. --set
applies to both. --resume: measure again into an --out that already holds this analysis. Ranks analysis.max_users covered users of analysis.split (a seeded sample) once with the
one-pass ranker (reranker.rank_batch_size) and once per analysis.generation_modes through generate
(analysis.generation_batch_size), timing each after an untimed one-user warm-up.

Writes to --out: config.yaml, run.json, generation.json (per method: metrics at k 1/5/10/20,
seconds, seconds per user, speed ratio to the one-pass ranker; per generation mode the invalid /
duplicate / complete accounting and mean new tokens), generation.md (the tables),
generations_<mode>.jsonl (per user: raw text, parse, generated rank of the target).
"""
from analysis.generation_baseline import compare_generation
from analysis.run_config import analysis_config
from pipeline.cli import parser, run_main
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir
from rerank.load_run import open_run


def main(argv: list[str] | None = None) -> None:
    p = parser(__doc__.splitlines()[0], config_required=False)
    p.add_argument("--run", required=True, help="reranker run directory (train_reranker.py / run_experiment.py)")
    args = p.parse_args(argv)
    run = open_run(args.run, args.overrides)
    if RunDir(args.out).path.resolve() == run.path.resolve():
        raise PipelineError(f"--out {args.out} is the run directory itself: write the analysis to another directory")
    cfg = analysis_config(run, args.config, args.overrides)
    ana = cfg.analysis
    if run.cfg.reranker.head != "label_tokens":
        raise PipelineError(
            f"{args.run} scores with the {run.cfg.reranker.head} head, which generation cannot produce: "
            "compare generation with a run trained with reranker.head=label_tokens"
        )
    rows = run.covered_rows(ana.split, ana.max_users)
    if not rows:
        raise PipelineError(f"no covered {ana.split} users in {args.run}: nothing to rank")
    out = RunDir(args.out).start(cfg, argv, resume=args.resume)
    model, tokenizer, style = run.load_model()
    print(f"generation baseline: {len(rows)} covered {ana.split} users, model {cfg.reranker.model}, "
          f"labels {style.scheme.name}, modes {', '.join(dict.fromkeys(ana.generation_modes))}")
    compare_generation(cfg, run.path, model, tokenizer, style, rows, run.titles, out.path)
    out.finish()
    print((out / "generation.md").read_text())


if __name__ == "__main__":
    run_main(main)
