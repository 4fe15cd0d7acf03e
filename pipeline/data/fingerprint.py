"""Content fingerprints of a dataset's raw files: what keys the preprocessing cache and what a run
records (run.json "data_files"), so that a run is one dataset.

Size and mtime do not identify content (a rewritten file can keep both, e.g. `touch -r`, a copy
tool that preserves times): the SHA-256 of the bytes does. Files are streamed in 1 MiB blocks, and
each file is hashed once per process (memoised on path, size, mtime, inode and ctime: the
status-change time moves on every write and cannot be set back the way mtime can).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.data.loaders import raw_files

_BLOCK = 1 << 20
_MEMO: dict[tuple, str] = {}


def file_digest(path: str | os.PathLike) -> str:
    """sha256 hex digest of the file's bytes."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    if key not in _MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(_BLOCK):
                h.update(block)
        _MEMO[key] = h.hexdigest()
    return _MEMO[key]


def data_fingerprint(cfg: DataConfig) -> dict[str, str | None]:
    """{file name: sha256 of its bytes, or None when it does not exist} of the configured dataset's
    raw files. Names, not paths, so that a moved checkout or virtual environment (the bundled
    ML-100K lives in site-packages) keeps the same fingerprint; the directory is in the config."""
    return {p.name: file_digest(p) if p.is_file() else None for p in raw_files(cfg)}


def changed_file(recorded: dict, now: dict) -> str | None:
    """The name of the first file whose fingerprint differs between `recorded` and `now`, else None."""
    for name in sorted(set(recorded) | set(now)):
        if recorded.get(name) != now.get(name):
            return name
    return None
