"""Load-test the HTTP reranker on loopback: a bounded number of requests at several concurrencies.

    python scripts/load_test.py --run runs/smoke --out runs/smoke_load [--model exports/smoke] \
        [--requests 64] [--concurrency 1,8,32] [--malformed 32] [--users 16] [--set serve.max_batch_size=8 ...]

Starts scripts/serve.py on 127.0.0.1 (the run, or --model, e.g. its merged export), builds valid
requests from the run's covered test users (history = query, candidates = documents; every other user
in text mode: titles, the query one string), mixes malformed ones into the last burst, and writes
load_test.json (per level: p50/p95/p99 latency, throughput, errors, wrong scores; the server's batch
counts) and load_test.md to --out. The server is stopped at the end.
"""
import argparse
import os
from pathlib import Path

from pipeline.atomic import write_json, write_text
from pipeline.cli import run_main
from pipeline.errors import PipelineError


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="reranker run directory: served (unless --model) and the source of the requests")
    p.add_argument("--model", help="serve this model folder instead of the run (e.g. scripts/export_model.py's export)")
    p.add_argument("--out", required=True, help="directory for load_test.json, load_test.md, server.log")
    p.add_argument("--requests", type=int, default=64, help="valid requests per concurrency level")
    p.add_argument("--concurrency", default="1,8,32", help="comma-separated client concurrencies")
    p.add_argument("--malformed", type=int, default=32, help="malformed requests in the mixed burst (each next to a valid one)")
    p.add_argument("--users", type=int, default=16, help="distinct test users the requests cycle through")
    p.add_argument("--max-seconds", type=float, default=300.0, help="a level stops submitting after this many seconds")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="serve.py override, e.g. serve.max_wait_ms=5")
    args = p.parse_args(argv)
    try:
        levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    except ValueError:
        raise PipelineError(f"--concurrency {args.concurrency!r} must be comma-separated integers, e.g. 1,8,32") from None
    if not levels or min(levels) < 1 or args.requests < 1 or args.users < 1 or args.malformed < 0:
        raise PipelineError("--concurrency levels, --requests and --users must be >= 1, --malformed >= 0")

    from rerank.load_run import open_run
    from serving.load_test import markdown, run_load_test

    run = open_run(args.run)
    rows = run.covered_rows("test", max_users=args.users)
    if not rows:
        raise PipelineError(f"{args.run} has no covered test users to build requests from: use a run whose retriever covered some")
    # Every other user in text mode (what rerank clients such as the Cohere SDK send: the history as
    # one string of titles, one per line, and titles as documents), the rest as item ids.
    titles = run.titles
    payloads = [
        {"query": "\n".join(titles[h] for h in r["history"]), "documents": [titles[c] for c in r["candidates"]]} if i % 2
        else {"query": list(r["history"]), "documents": list(r["candidates"])}
        for i, r in enumerate(rows)
    ]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    source = ["--model", args.model] if args.model else ["--run", args.run]
    result = run_load_test(
        source, payloads, out / "server.log", args.overrides, args.requests, levels, args.malformed, args.max_seconds,
        env={**os.environ},
    )
    write_json(out / "load_test.json", result)
    write_text(out / "load_test.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    run_main(main)
