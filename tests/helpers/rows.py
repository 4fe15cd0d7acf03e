"""Hand-built candidates rows with known ranks."""
from __future__ import annotations

from pipeline.config import load_config
from tests.helpers.tokenizers import titles

ITEMS = {f"i{n}": t for n, t in enumerate(titles(12, "item "))}


def candidates_row(user: str, cands: list[str], target: str) -> dict:
    return {"user": user, "history": ["i10", "i11"], "candidates": cands, "scores": [-float(j) for j in range(len(cands))], "target": target}


# Four users, five candidates each. Retriever ranks of the target: a 3, b 1, c not covered, d 5.
ROWS = [
    candidates_row("a", ["i0", "i1", "i2", "i3", "i4"], "i2"),
    candidates_row("b", ["i5", "i6", "i7", "i8", "i9"], "i5"),
    candidates_row("c", ["i0", "i1", "i2", "i3", "i4"], "i9"),
    candidates_row("d", ["i9", "i8", "i7", "i6", "i5"], "i5"),
]

CFG = load_config(None).reranker
