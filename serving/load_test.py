"""A bounded load test of the HTTP server on loopback: latency, throughput, errors, and correctness.

`run_load_test` starts scripts/serve.py on 127.0.0.1 (`serving.launch.ServerProcess`), scores every payload once
alone (the reference, and the warm-up), then for each concurrency level sends a fixed number of
valid requests from that many client threads, and finally a burst at the highest level with
malformed requests mixed into valid ones. Every 200 answer is checked against the reference (same
ranking, scores within `tolerance`), every malformed one must get a 4xx. Nothing runs unbounded: a
level stops submitting after `max_seconds`, and the server is stopped at the end whatever happens.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from pipeline.markdown import markdown_table
from serving.launch import ServerProcess, post_json

# Bodies a client gets wrong: each must be answered 4xx (one line) while valid requests keep working.
MALFORMED: tuple[Any, ...] = (
    {"query": ["1"], "documents": []},
    {"query": [], "documents": ["1"]},
    {"query": ["1"], "documents": [None]},
    {"query": 5, "documents": ["1"]},
    {"query": "Toy Story (1995)", "documents": [1]},  # text mode: an integer (an item id) is no title
    {"query": "\n\n", "documents": ["Fargo (1996)"]},  # text mode: no history line
    {"documents": ["1"]},
    {"query": ["1"], "documents": ["1"], "top_n": -1},
    {"query": ["1"], "documents": [{"title": "x"}]},
    b"{truncated",
    b"",
)


@dataclass
class Outcome:
    status: int
    latency_s: float
    body: Any
    payload: int  # index into the valid payloads, -1 for a malformed request


def _send(url: str, body: Any, payload: int, timeout_s: float) -> Outcome:
    start = time.perf_counter()
    try:
        status, answer = post_json(url, body, timeout_s)
    except OSError as e:  # a refused / reset connection counts as an error, not a crash of the test
        status, answer = 0, {"detail": f"{type(e).__name__}: {e}"}
    return Outcome(status, time.perf_counter() - start, answer, payload)


def _scores(body: Mapping[str, Any]) -> dict[int, float]:
    return {r["index"]: r["relevance_score"] for r in body["results"]}


def _matches(got: Mapping[int, float], want: Mapping[int, float], tolerance: float) -> bool:
    return set(got) == set(want) and all(abs(got[j] - want[j]) <= tolerance * max(abs(want[j]), 1e-12) + 1e-9 for j in want)


def _summary(name: str, concurrency: int, outcomes: Sequence[Outcome], wall_s: float, reference: Sequence[Mapping[int, float]], tolerance: float) -> dict[str, Any]:
    valid = [o for o in outcomes if o.payload >= 0]
    malformed = [o for o in outcomes if o.payload < 0]
    ok = [o for o in valid if o.status == 200]
    wrong = sum(1 for o in ok if not _matches(_scores(o.body), reference[o.payload], tolerance))
    lat = np.array([o.latency_s for o in valid]) * 1000.0 if valid else np.array([np.nan])
    return {
        "level": name,
        "concurrency": concurrency,
        "requests": len(outcomes),
        "valid": len(valid),
        "ok": len(ok),
        "errors": len(valid) - len(ok),  # valid requests not answered 200
        "wrong_scores": wrong,  # answered 200 but not the reference scores
        "malformed": len(malformed),
        "malformed_4xx": sum(1 for o in malformed if 400 <= o.status < 500),
        "status_counts": {str(s): sum(1 for o in outcomes if o.status == s) for s in sorted({o.status for o in outcomes})},
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "p99_ms": float(np.percentile(lat, 99)),
        "throughput_rps": len(ok) / wall_s if wall_s > 0 else None,
        "wall_s": wall_s,
    }


def _level(url: str, jobs: Sequence[tuple[Any, int]], concurrency: int, max_seconds: float, timeout_s: float) -> tuple[list[Outcome], float]:
    """Send `jobs` ((body, payload index)) from `concurrency` threads; stop submitting after `max_seconds`."""
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = []
        for body, payload in jobs:
            if time.perf_counter() - start > max_seconds:
                break
            futures.append(pool.submit(_send, url, body, payload, timeout_s))
            # Keep at most `concurrency` requests in flight, so "concurrency" means what it says.
            while sum(1 for f in futures if not f.done()) >= concurrency:
                time.sleep(0.001)
        outcomes = [f.result() for f in futures]
    return outcomes, time.perf_counter() - start


def run_load_test(
    source: Sequence[str],
    payloads: Sequence[Mapping[str, Any]],
    log_path: Any,
    overrides: Sequence[str] = (),
    requests: int = 64,
    concurrencies: Sequence[int] = (1, 8, 32),
    malformed: int = 32,
    max_seconds: float = 300.0,
    timeout_s: float = 120.0,
    tolerance: float = 1e-4,
    env: Optional[Mapping[str, str]] = None,
) -> dict[str, Any]:
    """The load test's results (load_test.json's content): `source` is serve.py's ["--run", DIR] or
    ["--model", DIR]; `payloads` valid /v1/rerank bodies (catalogue or text mode), cycled through."""
    if not payloads:
        raise ValueError("the load test needs at least one valid payload")
    with ServerProcess(source, overrides, log_path, env=env) as srv:
        url = f"{srv.url}/v1/rerank"
        reference = []
        for i, body in enumerate(payloads):  # alone, one at a time: the reference answers
            out = _send(url, body, i, timeout_s)
            if out.status != 200:
                raise RuntimeError(f"reference request {i} got {out.status}: {out.body}")
            reference.append(_scores(out.body))
        levels = []
        for c in concurrencies:
            jobs = [(payloads[i % len(payloads)], i % len(payloads)) for i in range(requests)]
            outcomes, wall = _level(url, jobs, c, max_seconds, timeout_s)
            levels.append(_summary(f"valid x{c}", c, outcomes, wall, reference, tolerance))
        # The burst: malformed requests interleaved with as many valid ones, at the highest concurrency.
        c = max(concurrencies)
        jobs = []
        for i in range(malformed):
            jobs.append((MALFORMED[i % len(MALFORMED)], -1))
            jobs.append((payloads[i % len(payloads)], i % len(payloads)))
        outcomes, wall = _level(url, jobs, c, max_seconds, timeout_s)
        levels.append(_summary(f"mixed x{c}", c, outcomes, wall, reference, tolerance))
        info = srv.get("/info")
    return {
        "server": {k: info[k] for k in ("model", "backend", "base_model", "adapter", "device", "label_scheme", "batching")},
        "batch_stats": info["stats"],
        "server_url": srv.url,  # stopped by now
        "payloads": len(payloads),
        "text_payloads": sum(1 for p in payloads if isinstance(p.get("query"), str)),
        "tolerance": tolerance,
        "levels": levels,
    }


def markdown(result: Mapping[str, Any]) -> str:
    s = result["server"]
    lines = [
        f"# Load test: {s['model']} ({s['backend']}, {s['base_model']}, labels {s['label_scheme']}, {s['device']})",
        "",
        f"Batching: max {s['batching']['max_batch_size']} requests per pass, max wait {s['batching']['max_wait_ms']} ms; "
        f"{result['batch_stats']['requests']} requests in {result['batch_stats']['batches']} forward passes "
        f"(largest {result['batch_stats']['largest_batch']}). Loopback only (127.0.0.1).",
        "",
    ]
    rows = []
    for lv in result["levels"]:
        mal = f"{lv['malformed']} ({lv['malformed_4xx']})" if lv["malformed"] else "0"
        rps = f"{lv['throughput_rps']:.2f}" if lv["throughput_rps"] is not None else "-"
        rows.append([lv["level"], lv["concurrency"], lv["requests"], lv["ok"], lv["errors"], lv["wrong_scores"], mal,
                     f"{lv['p50_ms']:.0f}", f"{lv['p95_ms']:.0f}", f"{lv['p99_ms']:.0f}", rps])
    header = ["level", "concurrency", "requests", "ok", "errors", "wrong scores", "malformed (4xx)", "p50 ms", "p95 ms", "p99 ms",
              "req/s"]
    lines.append(markdown_table(header, rows, "l" + "r" * 10))
    lines += ["", f"wrong scores: a 200 answer whose scores differ from the request's reference answer (alone) by more than rel {result['tolerance']:g}."]
    return "\n".join(lines) + "\n"
