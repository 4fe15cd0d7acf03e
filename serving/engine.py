"""The reranker behind the HTTP API: a request becomes the run's prompt, its label scores, a ranking.

`RerankEngine.prepare` checks a request against the run (item ids of its catalogue, or titles in text
mode as `serving.schema.RerankRequest` defines it; no more documents than labels) and tokenizes its prompt with the
run's prompt builder (`rerank.prompting.prompts.encode_prompt`, the function training and batch ranking use,
with the adapter's saved `PromptStyle`): a title reaches it the same way whether the client sent the
item's id or its title. `score` runs a batch of prepared requests through the `Scorer` (one forward
pass for the local model) and removes the run's position prior when the run was calibrated. The
candidates keep the request's order (one pass, no permutation averaging), so a candidate shown in slot
j is scored by label j, exactly as `scripts/rank_reranker.py` scores a candidates row with
reranker.rank_permutations=1.

`load_engine` builds one from a reranker run directory (base model + adapter) or from a model folder
(scripts/export_model.py's merged export, or any model with a prompt_style.json).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from transformers import PreTrainedTokenizerBase

from pipeline.config import Config, load_config
from pipeline.errors import PipelineError
from pipeline.run_files import CONFIG_YAML, METRICS_JSON
from rerank.inference.calibration import Prior  # candidate count K -> the prior of each slot
from rerank.prompting.labels import LabelTokens
from rerank.prompting.prompts import LineSpans, check_lines_shown, encode_prompt, encode_prompt_ends, label_tokens, needs_lines
from rerank.prompting.style import PromptStyle, check_tokenizer
from serving.schema import RerankRequest, TextItem
from serving.scorer import Scorer


class RequestError(Exception):
    """A request the engine refuses: HTTP `status` and a one-line message naming the field and the fix."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


@dataclass(frozen=True)
class Prepared:
    """A checked request, ready to score."""

    prompt_ids: list[int]
    titles: list[str]  # the documents' titles, request order
    ids: list[Optional[str]]  # the documents' item ids (None for {text} documents)
    ends: Optional[list[int] | LineSpans] = None  # each candidate line's last token (the readout head; isolated lines: LineSpans), else None


class RerankEngine:
    def __init__(
        self,
        scorer: Scorer,
        tokenizer: PreTrainedTokenizerBase,
        style: PromptStyle,
        titles: Optional[Mapping[str, str]],
        prior: Prior,
        name: str,
        info: Mapping[str, Any],
    ) -> None:
        self.lines = needs_lines(style, scorer.readout)  # each line's tokens: the readout reads them, isolated lines need them
        check_lines_shown(style, self.lines and scorer.shows_isolated_lines)  # vLLM shows the prompt as written
        self.scorer, self.tokenizer, self.style = scorer, tokenizer, style
        self.titles, self.prior, self.name = titles, prior, name
        self._title_set = frozenset(titles.values()) if titles is not None else frozenset()  # text mode's id check
        self.tokens: LabelTokens = label_tokens(tokenizer, style)  # derived once from the tokenizer, never hard-coded
        self.max_k = largest_scorable_k(scorer, self.tokens)  # e.g. 9 for numbers on vLLM (10.. are two tokens)
        self.info = {
            **info,
            "model": name,
            "backend": scorer.name,
            "label_scheme": style.scheme.name,
            "head": "readout" if scorer.readout else "label_tokens",  # how a document is scored
            "labels": list(style.scheme.labels),
            "max_documents": self.max_k,
            "prompt_style": style.to_dict(),
            "catalogue_items": len(titles) if titles is not None else 0,
            "calibrated_k": sorted(prior),
        }

    # ---- requests -> prompts

    def prepare(self, req: RerankRequest) -> Prepared:
        if req.model is not None and req.model != self.name:
            raise RequestError(404, f"model: {req.model!r} is not served here: omit model or use {self.name!r}")
        text_mode = isinstance(req.query, str)  # the query's type decides what a string document is
        if not req.documents:
            raise RequestError(422, "documents: the list is empty: send at least one candidate (item id, title or {\"text\": title})")
        history = self._history(req.query)
        if not history:
            raise RequestError(
                422, "query: the history is empty: send the user's items, oldest first (a string of titles, one per "
                "line, or a list of item ids or {\"text\": title})",
            )
        n_labels = len(self.style.scheme.labels)
        if len(req.documents) > n_labels:
            raise RequestError(
                413,
                f"documents: {len(req.documents)} candidates but label scheme {self.style.scheme.name!r} has {n_labels} "
                f"labels: send at most {n_labels} documents (split larger pools into several requests)",
            )
        if len(req.documents) > self.max_k:
            try:
                self.scorer.check(self.tokens.for_k(len(req.documents)))
                why = ""
            except PipelineError as e:
                why = f" ({e})"
            raise RequestError(
                413, f"documents: {len(req.documents)} candidates, but the {self.scorer.name} backend scores at most "
                f"{self.max_k} with label scheme {self.style.scheme.name!r}{why}: send at most {self.max_k} documents",
            )
        cut = self.style.title_max_tokens
        if req.max_tokens_per_doc is not None and req.max_tokens_per_doc < cut:  # honouring it would change the prompt the run was trained on
            raise RequestError(
                422, f"max_tokens_per_doc: {req.max_tokens_per_doc} is below the {cut} tokens the run's prompt gives each "
                f"title: omit it or send at least {cut}",
            )
        if text_mode:
            self._refuse_ids([d for d in req.documents if isinstance(d, str)], "documents: with a string query documents are titles", "send query as a JSON list of item ids")
            docs = [self._text_document(item, f"documents[{i}]") for i, item in enumerate(req.documents)]
        else:
            docs = [self._title(item, f"documents[{i}]") for i, item in enumerate(req.documents)]
        titles = [t for t, _ in docs]
        if self.lines:
            ids, ends = encode_prompt_ends(history, titles, self.tokenizer, self.style)
            return Prepared(ids, titles, [i for _, i in docs], ends)
        return Prepared(encode_prompt(history, titles, self.tokenizer, self.style), titles, [i for _, i in docs])

    def _history(self, query: Any) -> list[str]:
        """The history's titles, oldest first: a list query's items, or a string query's lines."""
        if not isinstance(query, str):
            return [self._title(item, f"query[{i}]")[0] for i, item in enumerate(query)]
        # Each line verbatim (the same prompt as the item ids with those titles); a trailing newline or a
        # blank line is no item.
        lines = [line for line in query.splitlines() if line.strip()]
        self._refuse_ids(lines, "query: a string query is titles, one per line", "send the ids as a JSON list")
        return lines

    def _refuse_ids(self, texts: Sequence[str], rule: str, fix: str) -> None:
        """Text mode reads strings as titles. When every one of them is an item id of the catalogue and
        none a title, the client meant ids (e.g. an old client sending `"query": "1"`): say so rather
        than rank a prompt of numbers."""
        if not texts or self.titles is None or not all(t in self.titles and t not in self._title_set for t in texts):
            return
        raise RequestError(422, f"{rule}, but {texts[0]!r} is an item id of the run's dataset and no title: send the titles, or {fix}")

    def _text_document(self, item: Any, field: str) -> tuple[str, Optional[str]]:
        if isinstance(item, int):
            raise RequestError(
                422, f"{field}: an integer is an item id, but with a string query documents are titles: send the "
                "title, or send query as a JSON list of item ids",
            )
        return self._given_title(item.text if isinstance(item, TextItem) else item, field), None

    def _given_title(self, text: str, field: str) -> str:
        """A title the client wrote. Blank is refused (the prompt would show an empty line); line breaks
        and runs of spaces are the prompt builder's to collapse (`rerank.prompting.titles.cut_title`)."""
        if not text.strip():
            raise RequestError(422, f"{field}: the title is blank: send the item's title")
        return text

    def _title(self, item: Any, field: str) -> tuple[str, Optional[str]]:
        if isinstance(item, TextItem):
            return self._given_title(item.text, field), None
        key = str(item)
        if self.titles is None:
            raise RequestError(
                422, f"{field}: item id {key!r} given, but this server has no catalogue (a model folder without the "
                "run's config.yaml): send {\"text\": title} instead, or serve the run with --run",
            )
        if key not in self.titles:
            raise RequestError(
                422, f"{field}: unknown item id {key!r}: send an original item id of the run's dataset "
                f"({len(self.titles)} items), or {{\"text\": title}}",
            )
        return self.titles[key], key

    # ---- prompts -> scores

    def score(self, batch: Sequence[Prepared]) -> list[list[float]]:
        """Label scores (calibrated when the run was) of each prepared request, request order: the
        requests of one candidate count K share one scorer call (one forward pass)."""
        out: list[list[float]] = [[] for _ in batch]
        by_k: dict[int, list[int]] = {}
        for i, p in enumerate(batch):
            by_k.setdefault(len(p.titles), []).append(i)
        for k, idx in by_k.items():
            ends = [batch[i].ends for i in idx] if self.lines else None
            scores = self.scorer.score([batch[i].prompt_ids for i in idx], self.tokens.for_k(k), ends)
            offsets = self.prior.get(k, [0.0] * k)  # the slot's prior; slot j shows documents[j]
            for i, row in zip(idx, scores):
                out[i] = [s - o for s, o in zip(row, offsets)]
        return out


def largest_scorable_k(scorer: Scorer, tokens: LabelTokens) -> int:
    """The most candidates per request the scorer can score with these labels (all of them locally;
    on vLLM, as long as every label is one token). Fails at start when it cannot score even one."""
    error: Optional[PipelineError] = None
    for k in range(len(tokens.labels), 0, -1):
        try:
            scorer.check(tokens.for_k(k))
            return k
        except PipelineError as e:
            error = error or e
    raise error  # type: ignore[misc]  # the message for the full label set names the fix


def softmax(scores: Sequence[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(s - top) for s in scores]
    total = sum(exps)
    return [e / total for e in exps]


# ----------------------------------------------------------------------------------------
# Loading


def run_prior(metrics_file: Path) -> Prior:
    """The position prior a reranker run estimated (metrics.json, val section), {} when uncalibrated."""
    if not metrics_file.is_file():
        return {}
    section = json.loads(metrics_file.read_text(encoding="utf-8")).get("val", {}).get("calibration", {})
    return _prior(section)


def _prior(section: Mapping[str, Any]) -> Prior:
    if section.get("method", "none") == "none":
        return {}
    return {int(k): [float(x) for x in v] for k, v in section.get("prior", {}).items()}


def load_engine(cfg: Config, run_dir: Optional[str] = None, model_dir: Optional[str] = None) -> RerankEngine:
    """The engine of a reranker run (`run_dir`: base model + adapter, its dataset and prior) or of a
    model folder (`model_dir`: a merged export, with the export's config.yaml and prior when present).
    `cfg`: the run's config (or the folder's) with the command line's overrides."""
    scfg = cfg.serve
    if (run_dir is None) == (model_dir is None):
        raise PipelineError("serve one thing: pass --run RUN_DIR or --model DIR, not both or neither")
    if run_dir is not None:
        style_dir = _adapter_dir(run_dir)  # a reranker run: fails with the fix when it has no adapter
        titles: Optional[Mapping[str, str]] = _titles(cfg)
        prior = run_prior(Path(run_dir) / METRICS_JSON)
        name = scfg.name or Path(run_dir).resolve().name
        info = {"run": str(Path(run_dir).resolve()), "adapter": str(style_dir.resolve()), "base_model": cfg.reranker.model}
    else:
        folder = Path(model_dir)
        if not (folder / "prompt_style.json").is_file():
            raise PipelineError(
                f"{folder} has no prompt_style.json, so the prompt format it was trained on is unknown: "
                "export a run with scripts/export_model.py, or serve the run itself with --run"
            )
        titles = _titles(cfg) if (folder / CONFIG_YAML).is_file() else None  # the export's run catalogue
        export = folder / "export.json"
        prior = _prior(json.loads(export.read_text(encoding="utf-8")).get("calibration") or {}) if export.is_file() else {}
        name = scfg.name or folder.resolve().name
        info = {"model_dir": str(folder.resolve()), "adapter": None, "base_model": str(folder.resolve())}
        style_dir = folder
    style = PromptStyle.load(style_dir)
    if not scfg.calibration:
        prior = {}
    scorer, tokenizer = _scorer(cfg, run_dir, model_dir)
    check_tokenizer(style, tokenizer)
    from pipeline.device import resolve_device

    info["device"] = resolve_device(cfg.reranker.device) if scfg.backend == "local" else scfg.vllm_url
    return RerankEngine(scorer, tokenizer, style, titles, prior, name, info)


def _adapter_dir(run_dir: str) -> Path:
    from rerank.model.adapter import resolve_adapter_dir

    return resolve_adapter_dir(run_dir)


def _titles(cfg: Config) -> Mapping[str, str]:
    """Original item id -> title of the config's dataset (the catalogue item ids refer to)."""
    from pipeline.data import load_dataset
    from pipeline.data.dataset import titles_by_item

    return titles_by_item(load_dataset(cfg.data))


def _scorer(cfg: Config, run_dir: Optional[str], model_dir: Optional[str]) -> tuple[Scorer, PreTrainedTokenizerBase]:
    scfg, rcfg = cfg.serve, cfg.reranker
    if scfg.backend == "vllm":
        from rerank.model.adapter import resolve_adapter_dir
        from rerank.model.readout import READOUT_FILE, adapter_has_readout
        from rerank.model.sources import load_tokenizer

        if (run_dir is not None and adapter_has_readout(resolve_adapter_dir(run_dir))) or (
            model_dir is not None and (Path(model_dir) / READOUT_FILE).is_file()
        ):
            raise PipelineError("this reranker scores with the readout head, which vLLM cannot compute: use serve.backend=local")
        from serving.vllm_backend import VLLMScorer

        scorer = VLLMScorer(scfg.vllm_url, scfg.vllm_model, timeout_s=scfg.vllm_timeout_s, max_prompts=rcfg.rank_batch_size)
        scorer.models()  # at start: the server answers and serves the adapter's name (else the fix)
        return scorer, load_tokenizer(rcfg.model if run_dir else str(model_dir), cache_dir=rcfg.model_cache_dir)
    from serving.scorer import LocalScorer

    if run_dir is not None:
        from rerank.model.adapter import load_adapter
        from rerank.model.sources import load_from_config

        base, tokenizer = load_from_config(rcfg)
        model = load_adapter(base, run_dir)
    else:
        from rerank.model.sources import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(
            str(model_dir), dtype=rcfg.dtype, device=rcfg.device, load_in_4bit=rcfg.load_in_4bit, cache_dir=rcfg.model_cache_dir
        )
    return LocalScorer(model, tokenizer.pad_token_id, rcfg.rank_batch_size), tokenizer


def config_for(run_dir: Optional[str], model_dir: Optional[str], overrides: Sequence[str]) -> Config:
    """The config to serve with: RUN/config.yaml (or the model folder's, when exported with one) plus
    `overrides`; a bare model folder gets the defaults with reranker.model = the folder."""
    if run_dir is not None:
        return load_config(Path(run_dir) / CONFIG_YAML, list(overrides))
    folder = Path(model_dir)
    if (folder / CONFIG_YAML).is_file():
        return load_config(folder / CONFIG_YAML, [f"reranker.model={folder}", *overrides])
    return load_config(None, [f"reranker.model={folder}", *overrides])
