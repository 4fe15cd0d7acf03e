"""The official Cohere SDK (cohere==7.3.1, the client LangChain's and LlamaIndex's Cohere rerankers
wrap) against scripts/serve.py on 127.0.0.1: `cohere.Client` posts to /v1/rerank and `cohere.ClientV2`
to /v2/rerank, both in text mode (query = the history's titles, one per line; documents = titles),
and get the ranking the server's own /v1/rerank gives the same user by item ids. Errors reach the SDK
as its exceptions, at once (404 and 4xx are not retried)."""
import time

import cohere
import httpx
import pytest
from cohere.core.api_error import ApiError

from serving.launch import ServerProcess, post_json
from tests.helpers.scripts import ONE_THREAD

MODEL = "run"  # the served name: the smoke run's directory name


@pytest.fixture(scope="module")
def server(smoke_run, tmp_path_factory):
    run, _ = smoke_run
    with ServerProcess(["--run", str(run)], [], tmp_path_factory.mktemp("cohere") / "server.log", env=ONE_THREAD) as srv:
        yield srv


@pytest.fixture(scope="module")
def user(smoke_run):
    """One covered test user: (history ids, candidate ids, history titles, candidate titles)."""
    from rerank.load_run import open_run

    run = open_run(smoke_run[0])
    row = run.covered_rows("test", max_users=1)[0]
    return row["history"], row["candidates"], [run.titles[i] for i in row["history"]], [run.titles[i] for i in row["candidates"]]


def sdk(cls, server):
    # trust_env=False: a machine-wide HTTP(S)_PROXY must not receive calls to our loopback server;
    # the timeout bounds every call, so a server that never answered would fail the test, not hang it.
    return cls(base_url=server.url, api_key="x", httpx_client=httpx.Client(trust_env=False, timeout=60))


def ranking(results):
    return [(r.index, r.relevance_score) for r in results]


def test_v1_and_v2_rank_as_the_native_call(server, user):
    history, candidates, history_titles, titles = user
    status, native = post_json(f"{server.url}/v1/rerank", {"query": history, "documents": candidates})
    assert status == 200, native
    want = [(r["index"], r["relevance_score"]) for r in native["results"]]
    query = "\n".join(history_titles)  # oldest first, as the ids were
    calls = {
        "v1": sdk(cohere.Client, server).rerank(model=MODEL, query=query, documents=titles),
        "v1 objects": sdk(cohere.Client, server).rerank(model=MODEL, query=query, documents=[{"text": t} for t in titles]),
        "v2": sdk(cohere.ClientV2, server).rerank(model=MODEL, query=query, documents=titles),
    }
    for name, resp in calls.items():
        got = ranking(resp.results)
        assert [j for j, _ in got] == [j for j, _ in want], name
        assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-5, abs=1e-9), name
        assert resp.id.startswith("rerank-") and resp.meta.tokens.input_tokens == native["usage"]["prompt_tokens"]
        assert resp.results[0].label == chr(ord("A") + resp.results[0].index)  # our extra field, kept by the SDK


def test_top_n_and_return_documents(server, user):
    *_, history_titles, titles = user
    query = "\n".join(history_titles)
    v1 = sdk(cohere.Client, server).rerank(model=MODEL, query=query, documents=titles, top_n=2, return_documents=True)
    assert len(v1.results) == 2 and all(r.document.text == titles[r.index] for r in v1.results)
    v2 = sdk(cohere.ClientV2, server).rerank(model=MODEL, query=query, documents=titles, top_n=3, max_tokens_per_doc=4096, priority=0)
    assert len(v2.results) == 3 and [r.index for r in v2.results][:2] == [r.index for r in v1.results]
    assert all(getattr(r, "document", None) is None for r in v2.results)
    # ClientV2 has no return_documents argument; raw v2 clients (vLLM's shape) get document {"text": ...}.
    status, body = post_json(f"{server.url}/v2/rerank", {"model": MODEL, "query": query, "documents": titles, "top_n": 1, "return_documents": True})
    assert status == 200 and body["results"][0]["document"] == {"text": titles[body["results"][0]["index"]]}


@pytest.mark.parametrize("cls", [cohere.Client, cohere.ClientV2], ids=["v1", "v2"])
def test_errors_reach_the_sdk_at_once(server, user, cls):
    *_, history_titles, titles = user
    query = "\n".join(history_titles)
    start = time.monotonic()
    with pytest.raises(cohere.NotFoundError) as e:
        sdk(cls, server).rerank(model="rerank-v3.5", query=query, documents=titles)
    assert "'rerank-v3.5' is not served here" in e.value.body["detail"]
    with pytest.raises(ApiError) as e:  # 413: no SDK class of its own, the SDK's ApiError
        sdk(cls, server).rerank(model=MODEL, query=query, documents=[f"Movie {i}" for i in range(21)])
    assert e.value.status_code == 413 and "at most 20" in e.value.body["detail"]
    assert time.monotonic() - start < 30  # answered, not retried or hung


def test_cohere_fields_that_would_change_the_answer_are_refused(server, user):
    *_, history_titles, titles = user
    query = "\n".join(history_titles)
    with pytest.raises(cohere.UnprocessableEntityError) as e:
        sdk(cohere.Client, server).rerank(model=MODEL, query=query, documents=titles, rank_fields=["title"])
    assert e.value.body["detail"].startswith("rank_fields: ") and "remove it" in e.value.body["detail"]
    with pytest.raises(cohere.UnprocessableEntityError) as e:
        sdk(cohere.ClientV2, server).rerank(model=MODEL, query=query, documents=titles, max_tokens_per_doc=4)
    assert "max_tokens_per_doc: 4 is below the 32 tokens" in e.value.body["detail"]
    ok = sdk(cohere.Client, server).rerank(model=MODEL, query=query, documents=titles, max_chunks_per_doc=10, top_n=1)
    assert len(ok.results) == 1


TEXT_MODE_BAD = [  # (body, words of the one-line 422)
    ({"query": "Toy Story (1995)", "documents": [1]}, ["documents[0]", "integer is an item id"]),
    ({"query": "Toy Story (1995)", "documents": [" "]}, ["documents[0]", "blank"]),
    ({"query": "\n \n", "documents": ["Fargo (1996)"]}, ["query", "empty"]),
    ({"query": "Toy Story (1995)", "documents": ["100", "258"]}, ["documents", "'100' is an item id", "JSON list"]),
    ({"query": 3, "documents": ["1"]}, ["query", "string or a list"]),
]


@pytest.mark.parametrize("body,words", TEXT_MODE_BAD, ids=[str(i) for i in range(len(TEXT_MODE_BAD))])
def test_text_mode_bad_input_gets_one_line_422(server, body, words):
    status, answer = post_json(f"{server.url}/v2/rerank", body)
    assert status == 422 and "\n" not in answer["detail"], answer
    for w in words:
        assert w in answer["detail"]


def test_text_mode_skips_blank_lines(server, user):
    *_, history_titles, titles = user
    plain = {"query": "\n".join(history_titles), "documents": titles}
    padded = {"query": "\n" + "\n\n".join(history_titles) + "\r\n", "documents": titles}
    (s1, a), (s2, b) = post_json(f"{server.url}/rerank", plain), post_json(f"{server.url}/rerank", padded)
    assert s1 == s2 == 200 and a["results"] == b["results"] and a["usage"] == b["usage"]
