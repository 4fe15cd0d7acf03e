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
    item ids of the dataset: any other id is an error (the file belongs to another dataset).

    Every problem is a one-line PipelineError naming the file, the line and the fix: bytes that
    are not UTF-8, a line that is not a JSON object (e.g. cut short by a killed writer), a
    missing or mistyped field (item ids must be strings, scores numbers), a candidate listed
    twice, as many scores as candidates, and (with `known_items`) an item the dataset lacks."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"candidates file not found: {path} (run scripts/train_retriever.py first, or fix the path)")
    rows = []
    for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise PipelineError(
                f"{path} line {lineno} is not valid UTF-8 (byte {e.start + 1} of the line): regenerate the file"
            ) from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise PipelineError(f"{path} line {lineno} is not valid JSON (truncated?): regenerate the file") from None
        if not isinstance(row, dict):
            raise PipelineError(f"{path} line {lineno} is not a JSON object: regenerate the file")
        _check_row(row, f"{path} line {lineno}", known_items)
        rows.append(row)
    return rows


def _check_row(row: dict, where: str, known_items: set[str] | None) -> None:
    for key, typ in REQUIRED.items():
        if not isinstance(row.get(key), typ):
            raise PipelineError(f"{where}: field {key!r} missing or not a {typ.__name__}: regenerate the file")
    for key in ("history", "candidates"):
        bad = [i for i in row[key] if not isinstance(i, str)]
        if bad:
            raise PipelineError(
                f"{where}: field {key!r} holds {bad[0]!r}, not an item id string: regenerate the file "
                "(item ids are the dataset's original ids, as strings)"
            )
    if any(isinstance(s, bool) or not isinstance(s, (int, float)) for s in row["scores"]):
        raise PipelineError(f"{where}: field 'scores' holds a value that is not a number: regenerate the file")
    if len(row["scores"]) != len(row["candidates"]):
        raise PipelineError(
            f"{where}: {len(row['scores'])} scores for {len(row['candidates'])} candidates: regenerate the file"
        )
    if len(set(row["candidates"])) != len(row["candidates"]):
        dup = next(i for n, i in enumerate(row["candidates"]) if i in row["candidates"][:n])
        raise PipelineError(f"{where}: candidate {dup!r} is listed twice: regenerate the file (each candidate once)")
    if known_items is not None:
        unknown = [i for i in [*row["candidates"], row["target"], *row["history"]] if i not in known_items]
        if unknown:
            raise PipelineError(
                f"{where}: unknown item id {unknown[0]!r}: the file was made from another dataset; "
                "regenerate it with the same data config"
            )
