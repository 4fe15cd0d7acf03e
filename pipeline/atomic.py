"""Atomic file writes: write to a temp file in the same directory, then rename, so a killed
run never leaves a half-written output under the final name."""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, TextIO

import yaml


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w") -> Iterator[TextIO]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# allow_nan=False: NaN/Infinity are not JSON (other readers refuse them) and a non-finite number in a
# results file is a wrong result; stages refuse them first with a message naming the user
# (pipeline.metrics.check_finite), this is the last line of defence and keeps every file strict JSON.


def write_json(path: str | os.PathLike, obj, indent: int | None = 2) -> None:
    with atomic_open(path) as f:
        f.write(json.dumps(obj, indent=indent, sort_keys=False, allow_nan=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    with atomic_open(path) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")


def write_yaml(path: str | os.PathLike, obj) -> None:
    with atomic_open(path) as f:
        yaml.safe_dump(obj, f, sort_keys=False, allow_unicode=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temp folder beside `path`; on clean exit replace `path` with it."""
    import shutil

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
