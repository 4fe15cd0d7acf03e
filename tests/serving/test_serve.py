"""The HTTP server (scripts/serve.py) in a subprocess on 127.0.0.1, with real HTTP requests: scores
equal scripts/rank_reranker.py's on the same users, bad requests get their 4xx and one line while the
server keeps serving, and concurrent requests batched into one forward pass score as alone."""
import json
import math
import threading

import pytest

from pipeline.candidates import read_rows
from serving.launch import ServerProcess, post_json
from tests.helpers.scripts import ONE_THREAD, run_script

N_USERS = 6


@pytest.fixture(scope="module")
def server(smoke_run, tmp_path_factory):
    """The smoke run served with a long batching window, so concurrent requests share a pass."""
    run, _ = smoke_run
    log = tmp_path_factory.mktemp("serve") / "server.log"
    with ServerProcess(["--run", str(run)], ["serve.max_wait_ms=300", "serve.max_batch_size=8"], log, env=ONE_THREAD) as srv:
        yield srv


@pytest.fixture(scope="module")
def ranked(smoke_run, tmp_path_factory):
    """scripts/rank_reranker.py on the smoke run, one pass per user (no permutations), no fusion:
    its `llm_scores` are what the server serves (calibrated with the run's prior)."""
    run, _ = smoke_run
    out = tmp_path_factory.mktemp("ranked") / "run"
    proc = run_script(
        "scripts/rank_reranker.py", "--run", str(run), "--out", str(out),
        "--set", "reranker.rank_permutations=1", "--set", "reranker.fusion=false", env=ONE_THREAD,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return read_rows(out / "rankings_test.jsonl")[:N_USERS]


def request_for(row, **extra):
    return {"query": row["history"], "documents": row["candidates"], **extra}


def softmax(xs):
    top = max(xs)
    e = [math.exp(x - top) for x in xs]
    return [v / sum(e) for v in e]


def test_scores_equal_rank_reranker(server, ranked):
    for row in ranked:
        status, body = post_json(f"{server.url}/v1/rerank", request_for(row))
        assert status == 200, body
        want = softmax(row["llm_scores"])
        got = {r["index"]: r["relevance_score"] for r in body["results"]}
        assert sorted(got) == list(range(len(row["candidates"])))
        for j, p in enumerate(want):
            assert got[j] == pytest.approx(p, rel=1e-4, abs=1e-7)
        scores = [r["relevance_score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)  # best first
        assert sum(scores) == pytest.approx(1.0)
        assert [r["label"] for r in body["results"]] == [chr(ord("A") + r["index"]) for r in body["results"]]
        assert body["usage"]["prompt_tokens"] > 50 and body["model"] == "run"


def test_alias_top_n_documents_and_titles(server, ranked):
    row = ranked[0]
    status, full = post_json(f"{server.url}/rerank", request_for(row, return_documents=True))
    assert status == 200
    status, top = post_json(f"{server.url}/v1/rerank", request_for(row, top_n=3))
    assert status == 200
    assert [r["index"] for r in top["results"]] == [r["index"] for r in full["results"][:3]]
    assert all("document" not in r for r in top["results"])
    first = full["results"][0]["document"]
    assert first["id"] == row["candidates"][full["results"][0]["index"]] and first["text"]
    # The same candidates given by title instead of id: the same prompt, so the same scores.
    titles = {r["document"]["id"]: r["document"]["text"] for r in full["results"]}
    by_text = {"query": row["history"], "documents": [{"text": titles[c]} for c in row["candidates"]]}
    status, body = post_json(f"{server.url}/v1/rerank", by_text)
    assert status == 200
    assert {r["index"]: r["relevance_score"] for r in body["results"]} == pytest.approx(
        {r["index"]: r["relevance_score"] for r in full["results"]}, rel=1e-5
    )


BAD = [  # (body, status, words the one-line message must hold)
    ({"query": ["1"], "documents": []}, 422, ["documents", "empty"]),
    ({"query": [], "documents": ["1"]}, 422, ["query", "empty"]),
    ({"query": ["1"], "documents": ["no-such-item"]}, 422, ["documents[0]", "unknown item id 'no-such-item'"]),
    ({"query": ["1"], "documents": [str(i) for i in range(1, 22)]}, 413, ["documents", "21 candidates", "at most 20"]),
    ({"query": ["1"], "documents": [1.5]}, 422, ["documents[0]", "item id"]),
    ({"query": "1", "documents": ["1"]}, 422, ["query", "list"]),
    ({"documents": ["1"]}, 422, ["query", "required"]),
    ({"query": ["1"], "documents": ["1"], "top_n": 0}, 422, ["top_n", "positive"]),
    ({"query": ["1"], "documents": ["1"], "rank_fields": ["x"]}, 422, ["rank_fields", "remove it"]),
    ({"query": ["1"], "documents": ["1"], "model": "other"}, 404, ["model", "'other'", "omit model"]),
    (b"{not json", 422, ["body", "JSON"]),
]


@pytest.mark.parametrize("body,status,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_one_line_4xx(server, ranked, body, status, words):
    got, answer = post_json(f"{server.url}/v1/rerank", body)
    assert got == status, answer
    message = answer["detail"]
    assert isinstance(message, str) and "\n" not in message
    for w in words:
        assert w in message
    # ... and the server keeps serving.
    ok, _ = post_json(f"{server.url}/v1/rerank", request_for(ranked[0], top_n=1))
    assert ok == 200


def test_health_info_and_openapi(server):
    assert server.get("/health") == {"status": "ok"}
    info = server.get("/info")
    assert info["label_scheme"] == "letters" and info["max_documents"] == 20 and info["backend"] == "local"
    assert info["adapter"].endswith("adapter") and info["base_model"] == "tiny-qwen2" and info["device"] == "cpu"
    assert info["calibrated_k"] == [20]  # the smoke run's permuted prior, estimated for K = 20
    assert info["prompt_style"]["scheme"]["name"] == "letters"
    schema = server.get("/openapi.json")
    assert {"/v1/rerank", "/rerank", "/health", "/info"} <= set(schema["paths"])
    assert "relevance_score" in json.dumps(schema["components"])


def test_concurrent_requests_share_a_pass_and_score_as_alone(server, ranked):
    alone = []
    for row in ranked:
        status, body = post_json(f"{server.url}/v1/rerank", request_for(row))
        assert status == 200
        alone.append({r["index"]: r["relevance_score"] for r in body["results"]})
    before = server.get("/info")["stats"]
    together: list = [None] * len(ranked)
    barrier = threading.Barrier(len(ranked))

    def call(i):
        barrier.wait()  # all at once, inside one 300 ms batching window
        together[i] = post_json(f"{server.url}/v1/rerank", request_for(ranked[i]))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(ranked))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = server.get("/info")["stats"]
    assert after["requests"] - before["requests"] == len(ranked)
    assert after["batches"] - before["batches"] < len(ranked)  # some requests shared a forward pass
    assert after["largest_batch"] > 1
    for (status, body), want in zip(together, alone):
        assert status == 200
        got = {r["index"]: r["relevance_score"] for r in body["results"]}
        # Left padding next to longer prompts changes only the last float bits.
        assert got == pytest.approx(want, rel=1e-5, abs=1e-9)


def test_front_end_on_the_vllm_backend(smoke_run, ranked, tmp_path):
    """serve.backend=vllm: the same /v1/rerank answers, scored by a (stub) vLLM server that runs the
    run's base model + adapter and answers /v1/completions in vLLM's format."""
    from rerank.load_run import open_run
    from tests.helpers.vllm_stub import StubVLLM

    run, _ = smoke_run
    model, tokenizer, _ = open_run(run).load_model()
    stub = StubVLLM(model, tokenizer)
    try:
        overrides = ["serve.backend=vllm", f"serve.vllm_url={stub.url}", "serve.vllm_model=reranker"]
        with ServerProcess(["--run", str(run)], overrides, tmp_path / "server.log", env=ONE_THREAD) as srv:
            info = srv.get("/info")
            assert info["backend"] == "vllm" and info["device"] == stub.url and info["max_documents"] == 20
            for row in ranked[:3]:
                status, body = post_json(f"{srv.url}/v1/rerank", request_for(row))
                assert status == 200, body
                got = {r["index"]: r["relevance_score"] for r in body["results"]}
                want = softmax(row["llm_scores"])
                for j, p in enumerate(want):
                    assert got[j] == pytest.approx(p, rel=1e-4, abs=1e-7)
        sent = stub.bodies[-1]
        assert sent["model"] == "reranker" and sent["max_tokens"] == 1 and len(sent["logprob_token_ids"]) == 20
    finally:
        stub.close()


def test_vllm_backend_without_a_server_fails_at_start(smoke_run, tmp_path):
    run, _ = smoke_run
    proc = run_script("scripts/serve.py", "--run", str(run), "--port", "0", "--set", "serve.backend=vllm", "--set", "serve.vllm_url=http://127.0.0.1:9")
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "127.0.0.1:9" in line


@pytest.mark.parametrize("override,words", [
    ("serve.backend=vllm", "serve.vllm_url"),
    ("serve.max_batch_size=0", "serve.max_batch_size"),
    ("serve.max_queue=0", "serve.max_queue"),
    ("serve.port=70000", "serve.port"),
    ("serve.max_wait_ms=-1", "serve.max_wait_ms"),
])
def test_serve_config_is_checked_at_start(override, words):
    from pipeline.config import load_config
    from pipeline.errors import PipelineError

    with pytest.raises(PipelineError, match=words.replace(".", r"\.")):
        load_config(None, [override])


def test_serve_script_refuses_unknown_keys(smoke_run):
    run, _ = smoke_run
    proc = run_script("scripts/serve.py", "--run", str(run), "--set", "serve.batch=4")
    assert proc.returncode == 2 and "unknown config key serve.'batch'" in proc.stderr, proc.stderr


def test_model_folder_without_prompt_style_is_refused(tmp_path):
    proc = run_script("scripts/serve.py", "--model", str(tmp_path))
    assert proc.returncode == 2 and "prompt_style.json" in proc.stderr and "export_model.py" in proc.stderr


def test_load_test_bounded_on_loopback(smoke_run, tmp_path):
    run, _ = smoke_run
    out = tmp_path / "load"
    proc = run_script(
        "scripts/load_test.py", "--run", str(run), "--out", str(out), "--requests", "8", "--concurrency", "1,4",
        "--malformed", "6", "--users", "3", env=ONE_THREAD,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((out / "load_test.json").read_text())
    levels = {lv["level"]: lv for lv in result["levels"]}
    assert set(levels) == {"valid x1", "valid x4", "mixed x4"}
    for lv in levels.values():
        assert lv["errors"] == 0 and lv["wrong_scores"] == 0
        assert lv["p50_ms"] <= lv["p95_ms"] <= lv["p99_ms"] and lv["throughput_rps"] > 0
    assert levels["valid x4"]["ok"] == 8
    mixed = levels["mixed x4"]
    assert mixed["malformed"] == 6 and mixed["malformed_4xx"] == 6 and mixed["ok"] == 6
    assert result["batch_stats"]["requests"] == 3 + 8 + 8 + 6  # reference + two levels + the burst's valid ones
    assert result["payloads"] == 3 and result["text_payloads"] == 1  # the second user in text mode (titles)
    assert "| valid x4 | 4 | 8 | 8 | 0 | 0 |" in (out / "load_test.md").read_text()
    # The server it started is gone.
    import urllib.error

    from serving.launch import _OPENER
    with pytest.raises((urllib.error.URLError, OSError)):
        _OPENER.open(result["server_url"] + "/health", timeout=2)


def test_merged_export_serves_the_runs_scores(smoke_run, ranked, tmp_path):
    """scripts/export_model.py's folder, served with --model: the adapter's scores (merged within
    float tolerance), the run's catalogue (item ids) and its calibration prior (from export.json)."""
    run, _ = smoke_run
    export = tmp_path / "export"
    proc = run_script("scripts/export_model.py", "--run", str(run), "--out", str(export), env=ONE_THREAD)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with ServerProcess(["--model", str(export)], [], tmp_path / "server.log", env=ONE_THREAD) as srv:
        info = srv.get("/info")
        assert info["adapter"] is None and info["model"] == "export" and info["calibrated_k"] == [20]
        for row in ranked[:3]:
            status, body = post_json(f"{srv.url}/v1/rerank", request_for(row))
            assert status == 200, body
            got = {r["index"]: r["relevance_score"] for r in body["results"]}
            for j, p in enumerate(softmax(row["llm_scores"])):
                assert got[j] == pytest.approx(p, rel=1e-3, abs=1e-6)


def test_a_nan_score_is_a_one_line_500_never_a_ranking(smoke_run, ranked, tmp_path):
    """A backend that answers NaN (here a stub vLLM serving a model whose weights hold a NaN) gets a
    one-line 500: before, NaN ranked first with relevance_score NaN (not JSON)."""
    import torch

    from rerank.load_run import open_run
    from tests.helpers.vllm_stub import StubVLLM

    run, _ = smoke_run
    model, tokenizer, _ = open_run(run).load_model()
    with torch.no_grad():
        model.get_base_model().model.norm.weight[0] = float("nan")
    stub = StubVLLM(model, tokenizer)
    try:
        overrides = ["serve.backend=vllm", f"serve.vllm_url={stub.url}", "serve.vllm_model=reranker"]
        with ServerProcess(["--run", str(run)], overrides, tmp_path / "server.log", env=ONE_THREAD) as srv:
            status, body = post_json(f"{srv.url}/v1/rerank", request_for(ranked[0]))
            assert status == 500 and "non-finite score" in body["detail"] and "\n" not in body["detail"]
            assert srv.get("/health")  # the server goes on
    finally:
        stub.close()
