"""The HTTP API's request and response bodies: the shape rerank servers share (Cohere / Jina, as vLLM,
Infinity and rank_llm serve it), with items of the run's catalogue in place of free text.

FastAPI builds the OpenAPI schema (GET /openapi.json, /docs) from these models, so the field
descriptions here are the API's documentation.
"""
from __future__ import annotations

from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr


class TextItem(BaseModel):
    """An item given by its title instead of a catalogue id."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr = Field(min_length=1, description="the item's title, as the prompt shows it")


# A bare string or integer is an item id of the run's dataset (its original id); {"text": ...} a title.
Item = Union[StrictStr, StrictInt, TextItem]


class RerankRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"query": ["1", "50", "181"], "documents": ["100", "258", {"text": "Fargo (1996)"}], "top_n": 2}]
        },
    )
    model: Optional[StrictStr] = Field(None, description="the served model's name (GET /info); omitted = that model")
    query: list[Item] = Field(
        description="the user's history, oldest first: item ids of the run's dataset, or {text: title}; "
        "the prompt shows the most recent reranker.max_history of them"
    )
    documents: list[Item] = Field(
        description="the candidates to rank: item ids or {text: title}; at most as many as the label scheme has labels (20)"
    )
    top_n: Optional[StrictInt] = Field(None, ge=1, description="return only the best top_n results (default: all)")
    return_documents: StrictBool = Field(False, description="include each result's document (its id and title)")


class ResultDocument(BaseModel):
    text: str = Field(description="the title the prompt showed")
    id: Optional[str] = Field(None, description="the item id, when the request gave one")


class RerankResult(BaseModel):
    index: int = Field(description="position of the document in the request's documents")
    relevance_score: float = Field(
        description="softmax over the request's candidates of their label scores (log P(label | prompt) at the "
        "answer position, minus the run's position prior when calibrated): the results' scores sum to 1 "
        "over all documents, top_n or not"
    )
    label: str = Field(description="the label the candidate was shown with in the prompt (A, B, ...)")
    document: Optional[ResultDocument] = None


class Usage(BaseModel):
    prompt_tokens: int = Field(description="tokens of the prompt the model read")
    total_tokens: int = Field(description="= prompt_tokens: one forward pass, nothing generated")


class RerankResponse(BaseModel):
    id: str = Field(description="a unique id of this response")
    model: str
    results: list[RerankResult] = Field(description="best first")
    usage: Usage


class ErrorResponse(BaseModel):
    detail: str = Field(description="one line: the field at fault and the fix")
