"""Export a trained reranker run as a plain Hugging Face model folder (LoRA adapter merged into the base).

    python scripts/export_model.py --run runs/smoke --out exports/smoke [--set reranker.device=cpu ...]
    python scripts/rank_reranker.py ...  /  --set reranker.model=exports/smoke  (any script taking reranker.model)

--run: a reranker run directory (train_reranker.py / run_experiment.py). --out: a new (or empty)
folder; written all at once, so a failed export leaves nothing. --set changes how the base model is
loaded for the merge (reranker.device, reranker.dtype). Writes to --out: the merged weights,
config.json, the tokenizer, prompt_style.json, config.yaml (the run's, reranker.model = --out) and
export.json (source run, adapter, base model, git commits, the run's calibration prior).
See `rerank.export.export_merged`.
"""
from pipeline.cli import parser, run_main
from pipeline.errors import PipelineError


def main(argv=None):
    p = parser(__doc__.splitlines()[0], config_required=False)
    p.add_argument("--run", required=True, help="reranker run directory (train_reranker.py / run_experiment.py) to export")
    args = p.parse_args(argv)
    if args.config:
        raise PipelineError("export_model.py exports RUN/config.yaml's model: drop --config (use --set to change how it loads)")
    if args.resume:
        raise PipelineError("export_model.py writes --out in one step, there is nothing to resume: drop --resume")

    from rerank.export import export_merged  # after --help: imports torch

    out = export_merged(args.run, args.out, args.overrides)
    print(f"merged model written to {out}: load it with --set reranker.model={out}")


if __name__ == "__main__":
    run_main(main)
