"""The HTTP API's request and response bodies: the shape rerank servers share (Cohere v1/v2 / Jina, as
vLLM, Infinity and rank_llm serve it), so the Cohere SDK and clients built on it call us unchanged.

Two modes, told apart by the type of `query` (a body has one meaning, never a guess):
- list query (catalogue mode): history and documents are item ids of the run's dataset or {"text": title};
- string query (text mode, what every rerank client sends): the history as titles, one per line, and
  string documents are titles, never item ids.

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


# With a list query a bare string or integer is an item id of the run's dataset (its original id);
# with a string query a string is a title. {"text": ...} is a title in both.
Item = Union[StrictStr, StrictInt, TextItem]


class RerankRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"query": ["1", "50", "181"], "documents": ["100", "258", {"text": "Fargo (1996)"}], "top_n": 2},
                {"query": "Toy Story (1995)\nStar Wars (1977)\nReturn of the Jedi (1983)", "documents": ["Fargo (1996)", "Contact (1997)"], "top_n": 1},
            ]
        },
    )
    model: Optional[StrictStr] = Field(None, description="the served model's name (GET /info); omitted = that model")
    query: Union[StrictStr, list[Item]] = Field(
        description="the user's history, oldest first; the prompt shows the most recent reranker.max_history. "
        "A string is text mode: one title per line, oldest first (blank lines skipped), and string documents "
        "are then titles. A list is catalogue mode: item ids of the run's dataset, or {text: title}"
    )
    documents: list[Item] = Field(
        description="the candidates to rank, at most as many as the label scheme has labels (20). With a string "
        "query: titles (strings or {text: title}). With a list query: item ids or {text: title}"
    )
    top_n: Optional[StrictInt] = Field(None, ge=1, description="return only the best top_n results (default: all)")
    return_documents: StrictBool = Field(False, description="include each result's document (its title, and its id when given one)")
    # Cohere SDK fields. Accepted where they do not change the answer; rank_fields and relevant_spans
    # (which would) are refused as unknown fields.
    max_tokens_per_doc: Optional[StrictInt] = Field(
        None, ge=1, description="Cohere v2: a document's token budget; the prompt cuts each title to the run's "
        "title_max_tokens (GET /info, prompt_style), so a smaller value is refused rather than ignored"
    )
    max_chunks_per_doc: Optional[StrictInt] = Field(None, ge=1, description="Cohere v1: accepted, no effect (a title is one chunk)")
    priority: Optional[StrictInt] = Field(None, ge=0, description="Cohere v2: accepted, no effect (requests share one first-come queue)")


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


class MetaTokens(BaseModel):
    input_tokens: int = Field(description="= usage.prompt_tokens")
    output_tokens: int = Field(0, description="nothing is generated")


class Meta(BaseModel):
    """Cohere's place for token counts (the SDK reads `meta`; Jina and vLLM clients read `usage`)."""

    tokens: MetaTokens


class RerankResponse(BaseModel):
    id: str = Field(description="a unique id of this response")
    model: str
    results: list[RerankResult] = Field(description="best first")
    usage: Usage
    meta: Meta


class ErrorResponse(BaseModel):
    detail: str = Field(description="one line: the field at fault and the fix")
