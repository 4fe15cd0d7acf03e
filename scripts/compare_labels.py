"""Compare label schemes (letters A..T, numbers 1..20, any custom list) on the same candidates.

    python scripts/compare_labels.py --config configs/experiments/compare_labels.yaml --out runs/compare_labels

Each entry of analysis.variants (name: reranker overrides, e.g. `numbers: {label_scheme: numbers}`)
is trained and ranked into <out>/<name>/ with the same data, candidates, model, seed and budget;
finished variants are kept on a re-run with --resume. Writes to --out: compare_labels.md / .csv / .json: test
metrics on the covered subset and overall, how many labels take more than one token, and the mean
probability mass the model puts on valid labels.
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
    labels = {r.name: r.label_summary() for r in results}

    def mass(r):
        m = labels[r.name]["valid_mass_mean"]
        return "" if m is None else f"{m:.4f}"

    extra = [
        ("labels", lambda r: f"{labels[r.name]['labels'][0]}..{labels[r.name]['labels'][-1]}"),
        ("multi-token labels", lambda r: str(len(labels[r.name]["multi_token_labels"]))),
        ("valid-label mass", mass),
    ]
    header, rows = comparison_table(results, extra)
    table = markdown(header, rows)
    write_text(out / "compare_labels.md", f"# Label schemes, {cfg.data.dataset}, {cfg.reranker.model}, test split\n\n{table}")
    write_text(out / "compare_labels.csv", csv_text(header, rows))
    write_json(out / "compare_labels.json", {
        r.name: {"run": str(r.path), "labels": labels[r.name], "test": r.metrics, "train": r.train} for r in results
    })
    run.finish()
    print(table)


if __name__ == "__main__":
    run_main(main)
