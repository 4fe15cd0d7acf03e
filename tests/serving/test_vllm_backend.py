"""`serving.vllm_backend` against a stub vLLM server that computes REAL log-probs with tiny-qwen2, so
VLLMScorer's scores must equal the local backend's on the same prompts."""
from __future__ import annotations

import socket

import pytest

from pipeline.errors import PipelineError
from rerank.model.sources import load_model_and_tokenizer
from rerank.model.standins import TINY_QWEN2
from rerank.prompting.labels import LETTERS, NUMBERS
from rerank.prompting.prompts import encode_prompt, label_tokens
from rerank.prompting.style import make_style
from serving.scorer import LocalScorer
from serving.vllm_backend import VLLMScorer
from tests.helpers.tokenizers import CACHE_DIR, titles
from tests.helpers.vllm_stub import SERVED, StubVLLM

TOL = 1e-4  # float32 log-probs of a padded batch (local) vs one unpadded prompt (stub)


@pytest.fixture(scope="module")
def tiny():
    return load_model_and_tokenizer(TINY_QWEN2, cache_dir=CACHE_DIR, device="cpu")


@pytest.fixture()
def stub(tiny):
    server = StubVLLM(*tiny)
    yield server
    server.close()


def _prompts(tok, scheme, k: int, history_lengths=(0, 3, 8, 1, 5)) -> list[list[int]]:
    style = make_style(tok, scheme)
    return [encode_prompt(titles(n, "h "), titles(k, f"c{n} "), tok, style) for n in history_lengths]


def _lt(tok, scheme, k: int):
    return label_tokens(tok, make_style(tok, scheme)).for_k(k)


def _close(got, want) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert len(g) == len(w)
        assert max(abs(a - b) for a, b in zip(g, w)) < TOL, (g, w)


@pytest.mark.parametrize("scheme,k", [(LETTERS, 20), (LETTERS, 5), (NUMBERS, 9)])
def test_scores_equal_the_local_backend(tiny, stub, scheme, k):
    model, tok = tiny
    lt = _lt(tok, scheme, k)
    prompts = _prompts(tok, scheme, k)
    scorer = VLLMScorer(stub.url, "reranker", max_prompts=2)
    scorer.check(lt)  # single-token, prefix-free labels are accepted
    got = scorer.score(prompts, lt)
    want = LocalScorer(model, tok.pad_token_id, max_prompts=4).score(prompts, lt)
    _close(got, want)
    # Distinct per label and per prompt, so a wrong id or a wrong choice->prompt mapping would show.
    assert all(max(row) - min(row) > 1e-2 for row in got)
    assert max(abs(a - b) for a, b in zip(got[0], got[1])) > 1e-3


def test_request_body_and_batching(tiny, stub):
    _, tok = tiny
    lt = _lt(tok, LETTERS, 20)
    prompts = _prompts(tok, LETTERS, 20)  # 5 prompts, 2 per request -> 3 requests
    VLLMScorer(stub.url + "/v1/", "reranker", max_prompts=2).score(prompts, lt)  # the OpenAI-style base URL works too
    assert sorted(len(b["prompt"]) for b in stub.bodies) == [1, 2, 2]
    assert sorted(tuple(p) for b in stub.bodies for p in b["prompt"]) == sorted(tuple(p) for p in prompts)
    letter_ids = tok.convert_tokens_to_ids(list(LETTERS.labels))  # the tokenizer's own ids for "A".."T"
    for body in stub.bodies:
        assert body["model"] == "reranker"
        assert body["max_tokens"] == 1 and body["temperature"] == 0 and body["logprobs"] == 1
        assert body["return_tokens_as_token_ids"] is True
        assert body["logprob_token_ids"] == [s[0] for s in lt.scored_ids] == letter_ids
        assert all(isinstance(t, int) for p in body["prompt"] for t in p)


def test_numbers_over_nine_are_refused_before_any_request(tiny, stub):
    _, tok = tiny
    lt = _lt(tok, NUMBERS, 20)
    scorer = VLLMScorer(stub.url, "reranker")
    for call in (lambda: scorer.check(lt), lambda: scorer.score(_prompts(tok, NUMBERS, 20)[:1], lt)):
        with pytest.raises(PipelineError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg
        assert "multi-token labels 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20" in msg
        assert "labels 1, 2 scored with a terminator" in msg
        assert "label_scheme=letters" in msg and "serve.backend=local" in msg
    assert stub.bodies == []


@pytest.mark.parametrize(
    "mode,expect",
    [
        ("500", ["HTTP 500", "CUDA out of memory. Tried to allocate 2.00 GiB", "fix the vLLM server"]),
        ("400-old", ["HTTP 400", "maximum context length is 2048 tokens"]),
        ("old-vllm", ["does not return logprob_token_ids", "label A (id", "vLLM >= 0.34"]),
        ("drop-id", ["does not return logprob_token_ids", "label T (id"]),
        ("drop-choice", ["answered 1 choices for 2 prompts", "no choice index 1"]),
    ],
)
def test_server_faults_are_one_line_pipeline_errors(tiny, stub, mode, expect):
    _, tok = tiny
    stub.mode = mode
    with pytest.raises(PipelineError) as e:
        VLLMScorer(stub.url, "reranker").score(_prompts(tok, LETTERS, 20)[:2], _lt(tok, LETTERS, 20))
    msg = str(e.value)
    assert "\n" not in msg and stub.url in msg
    for part in expect:
        assert part in msg, msg


def test_unknown_model_timeout_and_connection_refused(tiny, stub):
    _, tok = tiny
    prompts, lt = _prompts(tok, LETTERS, 5)[:1], _lt(tok, LETTERS, 5)
    with pytest.raises(PipelineError, match=r"HTTP 404: The model `adapter` does not exist"):
        VLLMScorer(stub.url, "adapter").score(prompts, lt)
    stub.mode = "slow"
    with pytest.raises(PipelineError, match=r"did not answer POST /v1/completions within 0.3 s.*serve.vllm_timeout_s"):
        VLLMScorer(stub.url, "reranker", timeout_s=0.3).score(prompts, lt)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(PipelineError, match=rf"cannot reach vLLM at http://127.0.0.1:{port} .*fix serve.vllm_url") as e:
        VLLMScorer(f"http://127.0.0.1:{port}", "reranker").score(prompts, lt)
    assert "\n" not in str(e.value)


def test_models_checks_the_adapter_is_served(stub):
    assert VLLMScorer(stub.url, "reranker").models() == list(SERVED)
    with pytest.raises(PipelineError) as e:
        VLLMScorer(stub.url, "my-adapter").models()
    msg = str(e.value)
    assert f"serves {SERVED[0]}, reranker but not 'my-adapter'" in msg and "--lora-modules my-adapter=" in msg
    assert "\n" not in msg
