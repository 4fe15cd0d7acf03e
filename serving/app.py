"""The FastAPI application: POST /v1/rerank (aliases /v2/rerank, /rerank), GET /health, GET /info.

FastAPI (on uvicorn) because it is the stack the rerank servers we mirror are written in (vLLM's
and Infinity's OpenAPI front ends): pydantic validates the body and FastAPI publishes the schema at
/openapi.json and /docs without code of ours. What is ours: turning validation errors into one-line
4xx messages that name the field and the fix, and the micro-batcher (`MicroBatcher`) that lets
concurrent requests share a forward pass.
"""
from __future__ import annotations

import math
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, Sequence

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from pipeline.config import ServeConfig
from pipeline.errors import PipelineError
from serving.batcher import MicroBatcher, QueueFull
from serving.engine import Prepared, RequestError, RerankEngine, softmax
from serving.schema import ErrorResponse, Meta, MetaTokens, RerankRequest, RerankResponse, RerankResult, ResultDocument, Usage

ERRORS = {code: {"model": ErrorResponse} for code in (404, 413, 422, 500, 503)}
FIELDS = ", ".join(RerankRequest.model_fields)  # the schema is the one list of accepted fields
FIX = {  # what to send instead, by pydantic error type
    "missing": "add it",
    "extra_forbidden": f"remove it (fields: {FIELDS})",
    "list_type": "send a JSON list",
    "greater_than_equal": "send a positive integer",
    "bool_type": "send true or false",
    "int_type": "send an integer",
    "string_type": "send a string",
    "json_invalid": "send a valid JSON body",
    "model_attributes_type": "send a JSON object",
    "dict_type": "send a JSON object",
}
ITEM_FIX = 'send an item id (string or integer), a title (a string, when query is a string) or {"text": title}'
QUERY_FIX = 'send a string (titles, one per line, oldest first) or a JSON list (item ids or {"text": title})'


def _branch(part: Any) -> bool:
    """pydantic's union branch names in an error's loc ("str", "list[union[str,int,TextItem]]"): not fields."""
    return isinstance(part, str) and (part in ("str", "int", "TextItem") or part.startswith("list["))


def _field(loc: Sequence[Any]) -> str:
    """("body", "documents", 2, "text") -> "documents[2].text"."""
    out = ""
    for part in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def validation_message(errors: Sequence[dict]) -> str:
    """The first validation error as one line: the field, what is wrong, the fix."""
    errors = [{**e, "loc": [p for p in e.get("loc", ()) if not _branch(p)]} for e in errors]
    # A list query with a bad item fails both union branches: report the item, not "should be a string".
    if any(e["loc"][:2] == ["body", "query"] and len(e["loc"]) > 2 for e in errors):
        errors = [e for e in errors if e["loc"] != ["body", "query"]] or errors
    err = errors[0]
    loc = err["loc"]
    field = _field(loc)
    if err.get("type") == "json_invalid":
        return f"body: not valid JSON ({err.get('msg', '')}): send a JSON object"
    if loc == ["body", "query"] and err.get("type") in ("string_type", "list_type"):  # neither a string nor a list
        return f"query: Input should be a string or a list: {QUERY_FIX}"
    in_item = len(loc) >= 3 and loc[0] == "body" and loc[1] in ("query", "documents") and isinstance(loc[2], int)
    fix = ITEM_FIX if in_item and err.get("type") != "missing" else FIX.get(err.get("type", ""), "see GET /openapi.json")
    return f"{field}: {err.get('msg', 'invalid')}: {fix}"


def create_app(engine: RerankEngine, scfg: ServeConfig) -> FastAPI:
    batcher = MicroBatcher(engine.score, scfg.max_batch_size, scfg.max_wait_ms / 1000.0, scfg.max_queue)
    started = time.time()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(
        title="LLM reranker",
        version="1",
        description="Reranks a user's candidate items with a LoRA-tuned causal LM: one forward pass, the label "
        "scores at the answer position, softmax over the candidates.",
        lifespan=lifespan,
    )
    app.state.engine, app.state.batcher = engine, batcher

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_message(exc.errors())}, status_code=422)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    async def rerank(req: RerankRequest) -> RerankResponse:
        try:
            prepared: Prepared = await run_in_threadpool(engine.prepare, req)  # tokenizing off the event loop
        except PipelineError as e:  # the prompt builder refuses these documents (e.g. too long for the run's prompt budget)
            raise RequestError(422, f"documents: these cannot be put in the run's prompt ({e})") from None
        try:
            scores = await batcher.submit(prepared)
        except QueueFull:
            raise RequestError(503, f"server busy: {scfg.max_queue} requests are waiting (serve.max_queue): retry shortly") from None
        except Exception as e:  # a failed forward pass (or vLLM call): this request fails, the server goes on
            raise RequestError(500, f"scoring failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}): see the server log") from e
        if not all(math.isfinite(s) for s in scores):  # NaN would rank first and is not JSON: never a ranking
            bad = next(s for s in scores if not math.isfinite(s))
            raise RequestError(500, f"the model gave a non-finite score ({bad}) for this request: the served model or backend is broken; no ranking is returned")
        probs = softmax(scores)
        order = sorted(range(len(probs)), key=lambda j: -probs[j])  # stable: ties keep the request's order
        if req.top_n is not None:
            order = order[: req.top_n]
        labels = engine.style.scheme.for_k(len(prepared.titles))
        results = [
            RerankResult(
                index=j,
                relevance_score=probs[j],
                label=labels[j],
                document=ResultDocument(text=prepared.titles[j], id=prepared.ids[j]) if req.return_documents else None,
            )
            for j in order
        ]
        n = len(prepared.prompt_ids)
        return RerankResponse(
            id=f"rerank-{uuid.uuid4().hex}", model=engine.name, results=results,
            usage=Usage(prompt_tokens=n, total_tokens=n), meta=Meta(tokens=MetaTokens(input_tokens=n)),
        )

    # One handler for all three: the Cohere SDK posts to /v1/rerank (cohere.Client) and /v2/rerank
    # (cohere.ClientV2) with bodies this schema covers, and parses the same response shape from both
    # (id, results[index, relevance_score, document {text}], meta; our extra fields it keeps).
    for path in ("/v1/rerank", "/v2/rerank", "/rerank"):
        app.post(path, response_model=RerankResponse, response_model_exclude_none=True, responses=ERRORS, summary="Rerank candidate items for a user's history")(rerank)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/info")
    async def info() -> dict:
        stats = batcher.stats
        return {
            **engine.info,
            "batching": {"max_batch_size": scfg.max_batch_size, "max_wait_ms": scfg.max_wait_ms, "max_queue": scfg.max_queue},
            "stats": {
                "requests": stats.requests, "batches": stats.batches, "largest_batch": stats.largest_batch,
                "failed_batches": stats.failed_batches, "batch_sizes": {str(k): v for k, v in sorted(stats.sizes.items())},
                "uptime_s": round(time.time() - started, 1),
            },
        }

    return app
