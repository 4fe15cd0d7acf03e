"""The candidates / rankings file format (SPEC.md), read and written in one place.

One JSON object per line:
  {"user": str, "history": [item...], "candidates": [item...], "scores": [float...], "target": item}
Items are the dataset's ORIGINAL ids as strings; `candidates` are in retriever order. A rankings
file has the same fields (scores from the reranker, same candidate order) plus "label_scheme".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from pipeline.atomic import write_jsonl
from pipeline.errors import PipelineError

REQUIRED = {"user": str, "history": list, "candidates": list, "scores": list, "target": str}
ROW_FIELDS = tuple(REQUIRED)  # the fields every candidates/rankings row has


def candidates_path(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / f"candidates_{split}.jsonl"


def rankings_path(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / f"rankings_{split}.jsonl"


def write_rows(path: str | Path, rows: Iterable[dict]) -> None:
    write_jsonl(path, rows)


def read_rows(path: str | Path, known_items: set[str] | None = None) -> list[dict]:
    """Read and validate a candidates/rankings file. `known_items`, when given, is the set of
    item ids of the dataset: any other id is an error (the file belongs to another dataset)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"candidates file not found: {path} (run scripts/train_retriever.py first, or fix the path)")
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PipelineError(f"{path} is not valid UTF-8 (byte {e.start}): regenerate the file") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PipelineError(f"{path} line {lineno} is not valid JSON (truncated?): regenerate the file") from None
        if not isinstance(row, dict):
            raise PipelineError(f"{path} line {lineno} is not a JSON object: regenerate the file")
        for key, typ in REQUIRED.items():
            if not isinstance(row.get(key), typ):
                raise PipelineError(f"{path} line {lineno}: field {key!r} missing or not a {typ.__name__}: regenerate the file")
        if len(row["scores"]) != len(row["candidates"]):
            raise PipelineError(f"{path} line {lineno}: {len(row['scores'])} scores for {len(row['candidates'])} candidates")
        if known_items is not None:
            unknown = [i for i in [*row["candidates"], row["target"], *row["history"]] if i not in known_items]
            if unknown:
                raise PipelineError(
                    f"{path} line {lineno}: unknown item id {unknown[0]!r}: the file was made from another dataset; "
                    "regenerate it with the same data config"
                )
        rows.append(row)
    return rows
