"""The vLLM scoring backend: label scores from a vLLM (>= 0.34) OpenAI-compatible server.

The server runs the base model with the run's LoRA adapter (`vllm serve BASE --enable-lora
--lora-modules reranker=RUN/adapter`), so this process needs no model and the GPUs can be replicas
behind a load balancer. One POST /v1/completions scores a batch of token-id prompts: `max_tokens` 1
and `logprob_token_ids` (vLLM PR #43463) return, at the answer position, the log-probability over
the whole vocabulary of every requested label id, the number `rerank.inference.ranker.score_prompts` gives.
Only the next token is scored, so label sets scored by more than one token are refused (`check`).
"""
from __future__ import annotations

import http.client
import json
import socket
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional, Sequence

from pipeline.errors import PipelineError
from rerank.prompting.labels import LabelTokens

MAX_PARALLEL_REQUESTS = 8  # chunks in flight at once: a load balancer spreads them over replicas
_ERROR_CHARS = 300  # the server's message is cut so the error stays one readable line
# Direct connections, ignoring HTTP(S)_PROXY: vLLM replicas sit on the serving network, and a
# machine-wide proxy (set for the model hub) would otherwise swallow every scoring request.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _one_line(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= _ERROR_CHARS else text[: _ERROR_CHARS - 3] + "..."


class VLLMScorer:
    """`serving.scorer.Scorer` on a vLLM server. `model` is the served name of the adapter (the NAME
    of --lora-modules NAME=DIR); `max_prompts` caps the prompts per HTTP request."""

    name = "vllm"
    readout = False  # vLLM returns token log-probabilities, never hidden states: label heads only
    shows_isolated_lines = False  # vLLM takes token ids, no attention mask: candidate_attention causal only

    def __init__(self, base_url: str, model: str, timeout_s: float = 60.0, max_prompts: int = 64) -> None:
        if max_prompts < 1:
            raise PipelineError(f"vLLM max_prompts must be >= 1 (got {max_prompts})")
        if timeout_s <= 0:
            raise PipelineError(f"vLLM timeout must be > 0 s (got {timeout_s}): set serve.vllm_timeout_s")
        url = base_url.rstrip("/")
        # Accept the OpenAI-style base URL too (".../v1"), which is what vLLM's own docs print.
        self.base_url = url[: -len("/v1")] if url.endswith("/v1") else url
        self.model, self.timeout_s, self.max_prompts = model, timeout_s, max_prompts

    # ------------------------------------------------------------------ Scorer protocol

    def check(self, label_tokens: LabelTokens) -> None:
        """Refuse labels scored by more than one token: /v1/completions with max_tokens 1 returns the
        distribution at the answer position only, not after a label's first token."""
        long = [lab for lab, ids in zip(label_tokens.labels, label_tokens.scored_ids) if len(ids) > 1]
        if not long:
            return
        multi = set(label_tokens.multi_token_labels)
        parts = []
        if multi:
            parts.append(f"multi-token labels {', '.join(lab for lab in long if lab in multi)}")
        ended = [lab for lab in long if lab not in multi]
        if ended:
            parts.append(f"labels {', '.join(ended)} scored with a terminator (another label extends them)")
        raise PipelineError(
            f"the vLLM backend scores one token per label, but this label set has {' and '.join(parts)}: "
            "use reranker.label_scheme=letters (or at most 9 numbers), or serve.backend=local"
        )

    def score(
        self, prompts: Sequence[Sequence[int]], label_tokens: LabelTokens, ends: Optional[Sequence[Sequence[int]]] = None
    ) -> list[list[float]]:
        if ends is not None:
            raise PipelineError("the vLLM backend scores label tokens only, not the readout head: use serve.backend=local")
        self.check(label_tokens)  # a multi-token label would silently get its first token's score
        if any(len(p) == 0 for p in prompts):
            raise PipelineError("an empty prompt cannot be scored: build prompts with rerank.prompting.prompts.encode_prompt")
        ids = [seq[0] for seq in label_tokens.scored_ids]
        chunks = [list(range(s, min(s + self.max_prompts, len(prompts)))) for s in range(0, len(prompts), self.max_prompts)]
        out: list[list[float]] = [[] for _ in prompts]
        if not chunks:
            return out
        with ThreadPoolExecutor(max_workers=min(len(chunks), MAX_PARALLEL_REQUESTS)) as pool:
            for idx, rows in zip(chunks, pool.map(lambda c: self._score_chunk([prompts[i] for i in c], ids, label_tokens), chunks)):
                for i, row in zip(idx, rows):
                    out[i] = row
        return out

    # ------------------------------------------------------------------ server start

    def models(self) -> list[str]:
        """The ids GET /v1/models lists; PipelineError unless `self.model` is one of them."""
        body = self._request("GET", "/v1/models", None)
        served = [m.get("id") for m in body.get("data", []) if isinstance(m, dict)] if isinstance(body, dict) else []
        if self.model not in served:
            raise PipelineError(
                f"vLLM at {self.base_url} serves {', '.join(map(str, served)) or 'no model'} but not {self.model!r}: "
                f"start it with --enable-lora --lora-modules {self.model}=RUN/adapter, or set serve.vllm_model to a served id"
            )
        return served

    # ------------------------------------------------------------------ HTTP

    def _score_chunk(self, prompts: list[Sequence[int]], ids: list[int], lt: LabelTokens) -> list[list[float]]:
        body = self._request("POST", "/v1/completions", {
            "model": self.model,
            "prompt": [[int(t) for t in p] for p in prompts],  # token ids: no re-tokenization on the server
            "max_tokens": 1,
            "temperature": 0,
            "logprobs": 1,  # switches logprob output on; the ids below replace the natural top-k
            "logprob_token_ids": ids,
            "return_tokens_as_token_ids": True,  # keys "token_id:<id>", not token strings that can collide
        })
        choices = body.get("choices") if isinstance(body, dict) else None
        by_index = {c.get("index"): c for c in choices if isinstance(c, dict)} if isinstance(choices, list) else {}
        rows = []
        for i in range(len(prompts)):
            if i not in by_index:
                raise PipelineError(
                    f"vLLM at {self.base_url} answered {len(by_index)} choices for {len(prompts)} prompts (no choice index {i}): "
                    "it must be a vLLM OpenAI-compatible server (vllm serve); check serve.vllm_url"
                )
            rows.append(self._label_logprobs(by_index[i], ids, lt))
        return rows

    def _label_logprobs(self, choice: dict[str, Any], ids: list[int], lt: LabelTokens) -> list[float]:
        top = (choice.get("logprobs") or {}).get("top_logprobs") or [None]
        first = top[0] if isinstance(top[0], dict) else {}
        values = {}
        for key, value in first.items():
            if isinstance(key, str) and key.startswith("token_id:") and isinstance(value, (int, float)):
                values[int(key[len("token_id:"):])] = float(value)
        missing = [f"{lab} (id {t})" for lab, t in zip(lt.labels, ids) if t not in values]
        if missing:
            raise PipelineError(
                f"vLLM at {self.base_url} does not return logprob_token_ids (no log-prob for label {', '.join(missing[:3])}"
                f"{', ...' if len(missing) > 3 else ''}): it needs vLLM >= 0.34 (logprob_token_ids and "
                "return_tokens_as_token_ids on /v1/completions); upgrade vLLM or use serve.backend=local"
            )
        return [values[t] for t in ids]

    def _request(self, method: str, path: str, payload: dict[str, Any] | None) -> Any:
        url = self.base_url + path
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
        try:
            with _OPENER.open(req, timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            message = _server_message(e)
            # A vLLM without PR #43463 refuses the unknown field by name: say which version is needed.
            fix = ("it needs vLLM >= 0.34 (logprob_token_ids on /v1/completions): upgrade vLLM or use serve.backend=local"
                   if "logprob_token_ids" in message else
                   "fix the vLLM server (see its log) or serve.vllm_url / serve.vllm_model")
            raise PipelineError(f"vLLM at {self.base_url} answered {method} {path} with HTTP {e.code}: {message}; {fix}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)  # URLError wraps the socket error
            if isinstance(reason, (TimeoutError, socket.timeout)):
                raise PipelineError(
                    f"vLLM at {self.base_url} did not answer {method} {path} within {self.timeout_s:g} s: "
                    "check the server is up and not overloaded, or raise serve.vllm_timeout_s"
                ) from None
            raise PipelineError(
                f"cannot reach vLLM at {self.base_url} ({_one_line(getattr(reason, 'strerror', None) or reason or type(e).__name__)}): "
                "start it (vllm serve BASE --enable-lora --lora-modules reranker=RUN/adapter) or fix serve.vllm_url"
            ) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise PipelineError(
                f"vLLM at {self.base_url} answered {method} {path} with non-JSON ({_one_line(raw[:200].decode('utf-8', 'replace'))}): "
                "serve.vllm_url must point at a vLLM OpenAI-compatible server"
            ) from None


def _server_message(e: urllib.error.HTTPError) -> str:
    """vLLM's error text: {"error": {"message": ...}} (current) or {"message": ...} (older)."""
    try:
        raw = e.read().decode("utf-8", "replace")
    except OSError:
        raw = ""
    try:
        body = json.loads(raw)
    except ValueError:
        return _one_line(raw or e.reason)
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return _one_line(err["message"])
        if isinstance(err, str) and err:
            return _one_line(err)
        if body.get("message"):
            return _one_line(body["message"])
    return _one_line(raw)
