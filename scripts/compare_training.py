"""Compare training variants (negatives, two-stage pre-training, ...) on the same candidates.

    python scripts/compare_training.py --config configs/experiments/compare_training.yaml --out runs/compare_training

Each entry of analysis.variants (name: reranker overrides, e.g. `hard: {train_negatives: retriever}`,
`two_stage: {pretrain_steps: 16}`) is trained and ranked into <out>/<name>/ with the same data,
candidates, model, seed and ranking; finished variants are kept on a re-run with --resume. Writes to --out:
compare_training.md / .csv / .json with test metrics, the training set-up and its cost.
"""
from pathlib import Path

from analysis.compare import comparison_table, csv_text, load_variant, markdown, run_variants
from pipeline.atomic import write_json, write_text
from pipeline.cli import parser, run_main
from pipeline.config import load_config
from pipeline.rundir import RunDir


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    run = RunDir(out).start(cfg, argv, resume=args.resume)
    dirs = run_variants(cfg, out, argv)
    results = [load_variant(name, path) for name, path in dirs.items()]
    extra = [
        ("negatives", lambda r: r.config["reranker"]["train_negatives"]),
        ("stage-1 steps", lambda r: str(r.config["reranker"]["pretrain_steps"])),
        ("steps", lambda r: str(r.train["global_step"])),
        ("train loss", lambda r: f"{r.train['train_loss']:.4f}"),
    ]
    header, rows = comparison_table(results, extra)
    table = markdown(header, rows)
    write_text(out / "compare_training.md", f"# Training variants, {cfg.data.dataset}, {cfg.reranker.model}, test split\n\n{table}")
    write_text(out / "compare_training.csv", csv_text(header, rows))
    write_json(out / "compare_training.json", {r.name: {"run": str(r.path), "test": r.metrics, "train": r.train} for r in results})
    run.finish()
    print(table)


if __name__ == "__main__":
    run_main(main)
