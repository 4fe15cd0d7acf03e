"""The state probe: a linear unit fitted on the frozen model's candidate-line states.

    python scripts/probe_states.py --config configs/experiments/probe.yaml --out runs/probe \
        [--set retriever_run=runs/default] [--set reranker.train_covered_only=true]

Computes the reranker model's hidden state at the end of each candidate's prompt line for
cfg.probe.n_prompts training prompts (the reranker section's samples) and for the covered val users
(candidates shuffled), fits the readout's linear form on some users' training prompts and scores the
rest and val against chance (`analysis.state_probe.run_probe`). Writes to --out: config.yaml,
run.json, probe.json and probe.md. Without retriever_run the retriever is trained into --out first.
"""
from analysis.state_probe import REPORT_FILE, run_probe
from pipeline.cli import parser, run_main
from pipeline.config import load_config
from pipeline.rundir import RunDir
from retrieval.run import train_retriever


def main(argv=None):
    args = parser(__doc__.splitlines()[0]).parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    run = RunDir(args.out).start(cfg, argv, resume=args.resume)
    candidates = cfg.retriever_run
    if candidates is None:
        train_retriever(cfg, run, resume=args.resume)
        candidates = str(run.path)
    run_probe(cfg, run.path, candidates)
    run.finish()
    print((run.path / REPORT_FILE).read_text(encoding="utf-8"))


if __name__ == "__main__":
    run_main(main)
