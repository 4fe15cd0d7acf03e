"""Serve a trained reranker over HTTP: POST /v1/rerank (alias /rerank), GET /health, GET /info, /docs.

    python scripts/serve.py --run runs/default [--host 127.0.0.1] [--port 8000] [--set serve.max_batch_size=16 ...]
    python scripts/serve.py --model exports/default      # a merged export (scripts/export_model.py)
    python scripts/serve.py --run runs/default --set serve.backend=vllm --set serve.vllm_url=http://127.0.0.1:8001

Settings: the `serve` section of the config (`ServeConfig`: batching, queue bound, calibration, backend),
read from the run's config.yaml (or the export's) with --set overrides; --host/--port win over
serve.host/serve.port. Binds 127.0.0.1 unless told otherwise.
"""
import argparse

from pipeline.cli import run_main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--run", help="reranker run directory (train_reranker.py / run_experiment.py): base model + its adapter")
    what.add_argument("--model", help="model folder with prompt_style.json (scripts/export_model.py's merged export)")
    p.add_argument("--host", help="address to bind (default serve.host, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port to bind (default serve.port, 8000)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value, e.g. --set serve.max_wait_ms=5")
    args = p.parse_args(argv)
    overrides = list(args.overrides)
    if args.host is not None:
        overrides.append(f"serve.host={args.host}")
    if args.port is not None:
        overrides.append(f"serve.port={args.port}")

    from serving.engine import config_for, load_engine  # after argument parsing: --help stays instant

    cfg = config_for(args.run, args.model, overrides)
    engine = load_engine(cfg, run_dir=args.run, model_dir=args.model)

    import uvicorn

    from serving.app import create_app

    app = create_app(engine, cfg.serve)
    print(f"serving {engine.name} ({engine.info['backend']}, labels {engine.info['label_scheme']}) on http://{cfg.serve.host}:{cfg.serve.port}", flush=True)
    uvicorn.run(app, host=cfg.serve.host, port=cfg.serve.port, log_level="warning")


if __name__ == "__main__":
    run_main(main)
