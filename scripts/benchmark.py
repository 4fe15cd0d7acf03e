"""Benchmark the reranker's speed and memory claims, each as a ratio measured in one run.

    python scripts/benchmark.py --config configs/experiments/benchmark_tiny.yaml --out runs/benchmark_tiny \
        [--set retriever_run=RUN_DIR] [--users 32 --repeats 5 --warmup 1 --generation-repeats 3] \
        [--architecture qwen2.5-0.5b]

Prompts come from `retriever_run`'s candidates_<split>.jsonl when set, else from a popularity
retriever fitted on the config's data. Batch sizes: reranker.rank_batch_size (ranking),
reranker.train_batch_size (training step), analysis.generation_batch_size (generation).
Writes to --out: config.yaml, run.json, benchmark.json (per figure: raw numbers, ratio, target,
pass), benchmark.md (the table, printed). See the `analysis.benchmark` package for what each figure measures.
"""
from pipeline.atomic import write_json, write_text
from pipeline.cli import parser, run_main
from pipeline.config import load_config
from pipeline.rundir import RunDir


def main(argv=None):
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--users", type=int, default=32, help="users ranked (a seeded sample of the split's rows; default 32)")
    p.add_argument("--split", default="test", help="candidates split the prompts come from (default test)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs of each variant first (default 1)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs of each variant, median reported (default 5)")
    p.add_argument("--generation-repeats", type=int, default=3, help="timed rounds of generation + one-pass ranking (default 3)")
    p.add_argument("--architecture", default=None, help="random-init model of this size instead of reranker.model: "
                   "qwen2.5-0.5b, qwen2.5-1.5b, qwen2.5-7b (real Qwen2 tokenizer; for GPUs)")
    p.add_argument("--no-rss-check", dest="rss_check", action="store_false",
                   help="skip the training step's RSS measurement in fresh subprocesses (CPU)")
    args = p.parse_args(argv)

    from analysis.benchmark.report import markdown  # after --help: the run imports torch
    from analysis.benchmark.run import run_benchmark
    from analysis.benchmark.settings import BenchmarkSettings

    settings = BenchmarkSettings(
        users=args.users, split=args.split, warmup=args.warmup, repeats=args.repeats,
        generation_repeats=args.generation_repeats, rss_check=args.rss_check, architecture=args.architecture,
    )
    settings.validate()
    cfg = load_config(args.config, args.overrides)
    run = RunDir(args.out).start(cfg, argv)
    result = run_benchmark(cfg, settings)
    write_json(run / "benchmark.json", result)
    table = markdown(result)
    write_text(run / "benchmark.md", table)
    run.finish(benchmark={name: fig["pass"] for name, fig in result["figures"].items()})
    print(table)


if __name__ == "__main__":
    run_main(main)
