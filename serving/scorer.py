"""What turns tokenized prompts into label scores behind the HTTP front end: one interface, two backends.

A `Scorer` takes prompts that end where the answer starts (`rerank.prompting.prompts.encode_prompt`) and the
`LabelTokens` of their candidate count (`label_tokens(...).for_k(K)`), and returns, per prompt,
log P(label k | prompt) for each of the K labels: the numbers `rerank.inference.ranker.score_prompts` computes.

- `LocalScorer`: the model in this process (an adapter run or a merged export), one forward pass
  per call through `score_prompts`, so a batch of requests costs one pass.
- `serving.vllm_backend.VLLMScorer`: a vLLM server's `/v1/completions` (single-token labels only).
"""
from __future__ import annotations

from typing import Optional, Protocol, Sequence

from transformers import PreTrainedModel

from rerank.inference.ranker import score_prompts
from rerank.model.readout import has_readout
from rerank.prompting.labels import LabelTokens


class Scorer(Protocol):
    name: str  # "local" or "vllm", shown by GET /info
    readout: bool  # the model scores candidates with the readout head: score() needs each line's end
    shows_isolated_lines: bool  # score() takes LineSpans and shows those lines apart (candidate_attention isolated)

    def check(self, label_tokens: LabelTokens) -> None:
        """Raise PipelineError (one line, with the fix) if these labels cannot be scored here."""

    def score(
        self, prompts: Sequence[Sequence[int]], label_tokens: LabelTokens, ends: Optional[Sequence[Sequence[int]]] = None
    ) -> list[list[float]]:
        """Per prompt (input order), the K label scores (log-probabilities), or with the readout
        head the K readout scores read at `ends` (each candidate line's last token)."""


class LocalScorer:
    """The model in this process. `max_prompts` caps the prompts per forward pass (memory)."""

    name = "local"

    def __init__(self, model: PreTrainedModel, pad_id: int, max_prompts: int) -> None:
        self.model, self.pad_id, self.max_prompts = model, pad_id, max_prompts
        self.readout = has_readout(model)
        self.shows_isolated_lines = True  # score_prompts builds the isolated mask from LineSpans
        self.model.eval()

    def check(self, label_tokens: LabelTokens) -> None:
        return None  # score_prompts scores any label scheme (multi-token labels on the KV cache)

    def score(
        self, prompts: Sequence[Sequence[int]], label_tokens: LabelTokens, ends: Optional[Sequence[Sequence[int]]] = None
    ) -> list[list[float]]:
        return score_prompts(self.model, prompts, label_tokens, self.max_prompts, self.pad_id, progress=False, ends=ends)
