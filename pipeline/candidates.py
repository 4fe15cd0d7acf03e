"""The candidates / rankings file format (docs/design.md, "Run directories"), and the per-prefix train candidates file
(candidates_train_prefixes.jsonl, below), read and written in one place.

One JSON object per line:
  {"user": str, "history": [item...], "candidates": [item...], "scores": [float...], "target": item}
Items are the dataset's ORIGINAL ids as strings; `candidates` are in retriever order. A rankings
file has the same fields (scores from the reranker, same candidate order) plus "label_scheme".
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

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
    for lineno, row in _json_lines(path):
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


# ----------------------------------------------------------------------------------------
# Per-prefix train candidates (retriever.prefix_candidates): candidates_train_prefixes.jsonl
#
# One JSON object per user:
#   {"user": str, "positions": [t...], "targets": [item...], "candidates": [[item...]...]}
# For each position t (ascending, t >= 1) of the user's TRAIN sequence: the input is the train
# items before t, `targets[j]` the train item at positions[j] (it proves the file was made from
# this dataset's train split), `candidates[j]` the retriever's top-k for that input with the input
# masked, in retriever order (the target is neither forced in nor removed). Items are the
# dataset's original ids as strings. A user with no written prefix has empty lists.

PREFIX_FILE = "candidates_train_prefixes.jsonl"
PREFIX_REQUIRED = {"user": str, "positions": list, "targets": list, "candidates": list}


def prefix_candidates_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / PREFIX_FILE


def write_prefix_rows(path: str | Path, rows: Iterable[dict]) -> None:
    write_jsonl(path, rows)


def read_prefix_rows(path: str | Path, known_items: set[str] | None = None) -> list[dict]:
    """Read and validate a candidates_train_prefixes.jsonl file (format above). `known_items`, when
    given, is the set of the dataset's item ids: any other id is an error.

    Every problem is a one-line PipelineError naming the file, the line and the fix: bytes that are
    not UTF-8, a line that is not a JSON object, a missing or mistyped field, positions that are not
    ascending integers >= 1, as many targets and candidate lists as positions, a candidate listed
    twice in one list, a user on two lines, and (with `known_items`) an item the dataset lacks."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(
            f"prefix candidates file not found: {path} (run the retriever with retriever.prefix_candidates != 0, or fix the path)"
        )
    rows, lines_of = [], {}
    for lineno, row in _json_lines(path):
        where = f"{path} line {lineno}"
        _check_prefix_row(row, where, known_items)
        if row["user"] in lines_of:
            raise PipelineError(
                f"{where}: user {row['user']!r} already has line {lines_of[row['user']]}: regenerate the file (one line per user)"
            )
        lines_of[row["user"]] = lineno
        rows.append(row)
    return rows


class _NonFinite(ValueError):
    pass


def _refuse_constant(name: str):
    """json.loads accepts NaN / Infinity / -Infinity by default: a score that is none is refused."""
    raise _NonFinite(name)


def _json_lines(path: Path):
    """(line number, JSON object) of each non-blank line of `path`; one-line errors otherwise."""
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
            row = json.loads(line, parse_constant=_refuse_constant)
        except json.JSONDecodeError:
            raise PipelineError(f"{path} line {lineno} is not valid JSON (truncated?): regenerate the file") from None
        except _NonFinite as e:
            raise PipelineError(f"{path} line {lineno} holds {e}, which is not a finite number (nor strict JSON): regenerate the file") from None
        if not isinstance(row, dict):
            raise PipelineError(f"{path} line {lineno} is not a JSON object: regenerate the file")
        yield lineno, row


def _check_prefix_row(row: dict, where: str, known_items: set[str] | None) -> None:
    for key, typ in PREFIX_REQUIRED.items():
        if not isinstance(row.get(key), typ):
            raise PipelineError(f"{where}: field {key!r} missing or not a {typ.__name__}: regenerate the file")
    positions, targets, cands = row["positions"], row["targets"], row["candidates"]
    if any(isinstance(t, bool) or not isinstance(t, int) or t < 1 for t in positions):
        bad = next(t for t in positions if isinstance(t, bool) or not isinstance(t, int) or t < 1)
        raise PipelineError(f"{where}: position {bad!r} is not an integer >= 1: regenerate the file")
    if any(b <= a for a, b in zip(positions, positions[1:])):
        raise PipelineError(f"{where}: positions are not strictly ascending: regenerate the file (each prefix once, in order)")
    for key, values in (("targets", targets), ("candidates", cands)):
        if len(values) != len(positions):
            raise PipelineError(f"{where}: {len(values)} {key} for {len(positions)} positions: regenerate the file")
    bad = [i for i in targets if not isinstance(i, str)]
    if bad:
        raise PipelineError(
            f"{where}: field 'targets' holds {bad[0]!r}, not an item id string: regenerate the file "
            "(item ids are the dataset's original ids, as strings)"
        )
    for t, items in zip(positions, cands):
        if not isinstance(items, list) or any(not isinstance(i, str) for i in items):
            raise PipelineError(
                f"{where}: the candidates of position {t} are not a list of item id strings: regenerate the file "
                "(item ids are the dataset's original ids, as strings)"
            )
        if len(set(items)) != len(items):
            dup = next(i for n, i in enumerate(items) if i in items[:n])
            raise PipelineError(f"{where}: candidate {dup!r} is listed twice at position {t}: regenerate the file (each candidate once)")
    if known_items is not None:
        unknown = next((i for i in [*targets, *(i for items in cands for i in items)] if i not in known_items), None)
        if unknown is not None:
            raise PipelineError(
                f"{where}: unknown item id {unknown!r}: the file was made from another dataset; "
                "regenerate it with the same data config"
            )


# Where a rankings row keeps the LLM's raw scores (label log-probs, averaged over the orders), first
# found wins: `llm_raw_scores` (calibrated runs), `llm_scores` (uncalibrated runs), `scores` (older runs).
RAW_SCORE_KEYS = ("llm_raw_scores", "llm_scores", "scores")


def raw_scores(row: Mapping[str, Any]) -> Any:
    """A rankings row's raw LLM scores (`RAW_SCORE_KEYS`), None when it has none."""
    return next((row[key] for key in RAW_SCORE_KEYS if key in row), None)


def is_covered(row: Mapping[str, Any]) -> bool:
    """True when the user's target is among its candidates (only these users go to the LLM)."""
    return row["target"] in row["candidates"]


def covered_sample(rows: Sequence[Mapping[str, Any]], n: Optional[int], seed: int, stream: int) -> list[Mapping[str, Any]]:
    """The covered rows, or a uniform sample of `n` of them drawn from the RNG stream (seed, stream),
    in file order: the validation users of training, the calibration users (each its own stream)."""
    covered = [row for row in rows if is_covered(row)]
    if n is not None and len(covered) > n:
        keep = np.random.default_rng([seed, stream]).choice(len(covered), size=n, replace=False)
        covered = [covered[i] for i in sorted(keep.tolist())]
    return covered
