"""`PromptStyle`: every setting that shapes the prompt text, saved beside a model or adapter
(prompt_style.json) and loaded back, so inference uses exactly the format that was trained."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from jinja2.exceptions import TemplateError
from transformers import PreTrainedTokenizerBase

from pipeline.atomic import write_json
from pipeline.config import RerankerConfig
from pipeline.errors import PipelineError
from rerank.prompting.labels import LabelScheme, scheme_from_config

STYLE_FILE = "prompt_style.json"  # saved beside a model / adapter

# reranker.label_position -> the candidate line. Under causal attention a label written BEFORE its
# title (LlamaRec's "(A) Title", ours "A) Title") is read before the title exists, so its state
# carries nothing of the title; written AFTER it, the label token's state can carry the title's
# content, and the answer becomes "copy the label that follows the matching content". "both" writes
# it on each side.
# "after" starts its line with "- " so the title follows a space, as in the history's "1. Title":
# line-initial, "Toy" is "T"+"oy" where the history has " Toy", and the copy has nothing to match.
# "before" is "A) Title", not the paper's "(A) Title": Qwen's tokenizer merges "(A" into one token, so
# that prompt never shows the token "A" the model answers with (digits never merge: numbers did
# show theirs, so under Qwen letters-vs-numbers partly measured tokenisation). `check_labels_shown`.
CANDIDATE_FORMATS = {
    "before": "{label}) {title}",
    "after": "- {title} ({label})",
    "both": "{label}) {title} ({label})",
}

FORMAT_VERSION = 1  # bump when the rendering code changes the text for the same PromptStyle

# LlamaRec's task, worded for any catalogue (movies watched, products bought).
DEFAULT_INSTRUCTION = (
    "Given a user's history of watched or purchased items in chronological order, "
    "choose the item the user is most likely to interact with next from the candidate pool."
)

# Alpaca's preamble, as LlamaRec used it for Llama-2 (no chat template).
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request."
)


@dataclass(frozen=True)
class PromptStyle:
    """Everything that shapes the prompt text (and how the readout sees its lines). Serialisable; see `save` / `load`."""

    scheme: LabelScheme  # candidate labels and the answer instruction
    template: Literal["chat", "alpaca"] = "chat"  # the tokenizer's chat template, or Alpaca-style text
    instruction: str = DEFAULT_INSTRUCTION  # the task (system turn, or "### Instruction:")
    # Chat only: the turn holding the instruction; "user" (prepended to the user turn) for
    # templates that refuse a system role. make_style picks it.
    instruction_role: Literal["system", "user"] = "system"
    max_history: int = 20  # last N history items shown (paper: 20)
    title_max_tokens: int = 32  # each title cut to this many tokens (paper: 32)
    max_prompt_tokens: int = 1536  # prompt limit; oldest history dropped beyond it (paper: 1536)
    history_header: str = "User history:"
    candidate_header: str = "Candidate pool:"
    history_item_format: str = "{index}. {title}"  # index = 1..n, oldest first
    # "A) Title": set apart from the numbered history ("3. Title"), so "3)" never reads as history
    # item 3. Where the label sits is reranker.label_position (CANDIDATE_FORMATS).
    candidate_format: str = CANDIDATE_FORMATS["before"]
    # How the readout head's forward shows the candidate lines (reranker.candidate_attention): "causal"
    # = as written; "isolated" = each line attends to the shared prefix (instruction, history,
    # header) and to itself only, from the same positions, so a line's state never depends on the
    # lines drawn before it. Not text, but the prompt as the model reads it: saved with the adapter.
    candidate_attention: Literal["causal", "isolated"] = "causal"
    # Extra chat-template variables: Qwen3 templates think unless told not to; others ignore it.
    chat_template_kwargs: dict[str, Any] = field(default_factory=lambda: {"enable_thinking": False})
    # Fingerprint of the tokenizer's chat template this style was made for (None for alpaca);
    # check_tokenizer refuses a tokenizer whose template differs, so a saved format stays exact.
    chat_template_sha256: Optional[str] = None
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.max_history < 0:
            raise PipelineError(f"prompt max_history must be >= 0 (got {self.max_history})")
        if self.title_max_tokens < 1:
            raise PipelineError(f"prompt title_max_tokens must be >= 1 (got {self.title_max_tokens})")
        if self.max_prompt_tokens < 1:
            raise PipelineError(f"prompt max_prompt_tokens must be >= 1 (got {self.max_prompt_tokens})")
        if self.candidate_attention not in ("causal", "isolated"):
            raise PipelineError(f"prompt candidate_attention must be causal or isolated (got {self.candidate_attention!r})")
        if self.format_version != FORMAT_VERSION:
            raise PipelineError(
                f"prompt style format_version {self.format_version} != {FORMAT_VERSION} of this code: "
                "retrain the reranker or check out the code version that trained it"
            )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["scheme"] = self.scheme.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PromptStyle":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PipelineError(f"prompt style has unknown key {unknown[0]!r}: it was written by other code, retrain")
        d = dict(d)
        d["scheme"] = LabelScheme.from_dict(d["scheme"])
        return cls(**d)

    def save(self, directory: str | Path) -> Path:
        """Write prompt_style.json into `directory` (beside the model / adapter)."""
        path = Path(directory) / STYLE_FILE
        write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, directory: str | Path) -> "PromptStyle":
        path = Path(directory) / STYLE_FILE
        if not path.is_file():
            raise PipelineError(f"no {STYLE_FILE} in {directory}: point to a directory written by the reranker trainer")
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))


def _template_sha256(tokenizer: PreTrainedTokenizerBase) -> Optional[str]:
    tpl = getattr(tokenizer, "chat_template", None)
    if not isinstance(tpl, str) or not tpl:
        return None
    return hashlib.sha256(tpl.encode("utf-8")).hexdigest()


def make_style(
    tokenizer: PreTrainedTokenizerBase,
    scheme: LabelScheme,
    template: Literal["auto", "chat", "alpaca"] = "auto",
    **settings: Any,
) -> PromptStyle:
    """A PromptStyle for `tokenizer`: template "auto" = chat when the tokenizer has a chat template,
    else alpaca. `settings` are PromptStyle fields (max_history, title_max_tokens, ...)."""
    has_chat = _template_sha256(tokenizer) is not None
    if template == "auto":
        template = "chat" if has_chat else "alpaca"
    if template == "chat" and not has_chat:
        raise PipelineError("prompt template 'chat' but the tokenizer has no chat template: use template auto or alpaca")
    if template not in ("chat", "alpaca"):
        raise PipelineError(f"unknown prompt template {template!r}: use auto, chat or alpaca")
    fingerprint = _template_sha256(tokenizer) if template == "chat" else None
    style = PromptStyle(scheme=scheme, template=template, chat_template_sha256=fingerprint, **settings)
    if template == "chat":
        try:
            render_chat(tokenizer, style, "x", generation_prompt=True)
        except TemplateError as e:  # e.g. "System role not supported", raised by the template itself
            if "instruction_role" in settings:
                raise PipelineError(f"the tokenizer's chat template refuses this conversation ({e}): use prompt_template alpaca") from e
            style = dataclasses.replace(style, instruction_role="user")
            try:
                render_chat(tokenizer, style, "x", generation_prompt=True)
            except TemplateError as e2:
                raise PipelineError(f"the tokenizer's chat template refuses a user turn ({e2}): use prompt_template alpaca") from e2
    return style


def _config_settings(cfg: RerankerConfig) -> dict[str, Any]:
    """The PromptStyle fields a RerankerConfig sets directly (the template is resolved with a tokenizer)."""
    return {
        "max_history": cfg.max_history,
        "title_max_tokens": cfg.title_max_tokens,
        "max_prompt_tokens": cfg.max_prompt_tokens,
        "candidate_format": CANDIDATE_FORMATS[cfg.label_position],
        "candidate_attention": cfg.candidate_attention,
    }


def style_from_config(cfg: RerankerConfig, tokenizer: PreTrainedTokenizerBase) -> PromptStyle:
    """The PromptStyle a `pipeline.config.RerankerConfig` asks for."""
    return make_style(tokenizer, scheme_from_config(cfg), template=cfg.prompt_template, **_config_settings(cfg))


# Fields make_style resolves from the tokenizer (its chat template), not from the config and this code.
_TOKENIZER_FIELDS = ("template", "instruction_role", "chat_template_sha256")


def style_difference(saved: PromptStyle, cfg: RerankerConfig) -> Optional[tuple[str, Any, Any]]:
    """(field, saved value, value now) of the first text-shaping field in which `saved` (a finished
    run's prompt_style.json) differs from what this code writes for `cfg`; None when they agree.
    A run's config can be unchanged while the code's formats changed (e.g. "(A) Title" became
    "A) Title"): its figures then belong to another prompt than the config says."""
    now = PromptStyle(scheme=scheme_from_config(cfg), **_config_settings(cfg))
    for f in dataclasses.fields(PromptStyle):
        if f.name in _TOKENIZER_FIELDS:
            continue
        old, new = getattr(saved, f.name), getattr(now, f.name)
        if f.name == "scheme":
            old, new = old.to_dict(), new.to_dict()
        if old != new:
            return f.name, old, new
    return None


def check_tokenizer(style: PromptStyle, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a tokenizer whose chat template differs from the one the style was made for."""
    if style.template == "chat" and _template_sha256(tokenizer) != style.chat_template_sha256:
        raise PipelineError(
            "the tokenizer's chat template differs from the one this prompt style was trained with: "
            "load the tokenizer saved with the model/adapter"
        )


def chat_messages(style: PromptStyle, user_text: str) -> list[dict[str, str]]:
    if style.instruction_role == "system":
        return [{"role": "system", "content": style.instruction}, {"role": "user", "content": user_text}]
    return [{"role": "user", "content": style.instruction + "\n\n" + user_text}]


def render_chat(
    tokenizer: PreTrainedTokenizerBase, style: PromptStyle, user_text: str, generation_prompt: bool, answer: Optional[str] = None
) -> str:
    messages = chat_messages(style, user_text)
    if answer is not None:
        messages.append({"role": "assistant", "content": answer})
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt, **style.chat_template_kwargs
    )
