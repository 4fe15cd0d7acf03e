"""Shared, load-once objects for the rerank tests (imported by test_labels/test_prompts/test_models).

Plain cached functions rather than conftest fixtures: each loads once per pytest process however
many test modules ask. Tests that change a tokenizer must deepcopy it first.
"""
from __future__ import annotations

import functools

from transformers import PreTrainedTokenizerBase

from rerank.model.sources import load_tokenizer
from rerank.model.standins import SMOLLM2, TINY_QWEN2
from tests.helpers.scripts import REPO

# The repository's model cache (gitignored), wherever pytest is started from.
CACHE_DIR = REPO / ".cache" / "models"

# A few real catalogue-style titles: MovieLens (with years, articles moved to the front, commas,
# accents) and Amazon-style product names (digits, units, punctuation).
TITLES = [
    "Toy Story (1995)",
    "The Usual Suspects (1995)",
    "Twelve Monkeys (1995)",
    "Star Wars (1977)",
    "Léon: The Professional (1994)",
    "Crouching Tiger, Hidden Dragon (Wo hu cang long) (2000)",
    "Amélie (Fabuleux destin d'Amélie Poulain, Le) (2001)",
    "Neutrogena Hydro Boost Water Gel, 1.7 oz",
    "Super Mario Odyssey - Nintendo Switch",
    "L'Oréal Paris Voluminous Mascara, Black 330, 0.27 fl. oz",
    "2001: A Space Odyssey (1968)",
    "Se7en (1995)",
]


@functools.lru_cache(maxsize=None)
def qwen_tokenizer() -> PreTrainedTokenizerBase:
    """The real Qwen2 tokenizer (tiny-qwen2's), built once into .cache/models and reused."""
    return load_tokenizer(TINY_QWEN2, cache_dir=CACHE_DIR)


@functools.lru_cache(maxsize=None)
def smollm2_tokenizer() -> PreTrainedTokenizerBase:
    """SmolLM2-135M-Instruct's tokenizer (from the cached folder, else straight from the GGUF)."""
    return load_tokenizer(SMOLLM2, cache_dir=CACHE_DIR)


TOKENIZERS = {"qwen": qwen_tokenizer, "smollm2": smollm2_tokenizer}


def titles(n: int, prefix: str = "") -> list[str]:
    """n distinct realistic titles."""
    return [f"{prefix}{TITLES[i % len(TITLES)]} #{i}" for i in range(n)]
