"""Run directories (SPEC.md): config.yaml, run.json (provenance), metrics.json, data files."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

from pipeline.atomic import write_json, write_yaml
from pipeline.config import to_dict

# Versions recorded in run.json: what decides the numbers a run produces.
_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "recbole", "numpy", "pandas")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
            capture_output=True, text=True, timeout=10,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _machine() -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine()}
    try:
        import torch

        info["cpu_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def _versions() -> dict:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


class RunDir:
    """A run directory. `start()` writes config.yaml and run.json; `finish()` stamps the end."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def start(self, cfg, argv: list[str] | None = None) -> "RunDir":
        self.path.mkdir(parents=True, exist_ok=True)
        write_yaml(self.path / "config.yaml", to_dict(cfg))
        self._run = {
            "command": [sys.executable, *(sys.argv if argv is None else ["<api>", *argv])],
            "git_commit": _git_commit(),
            "packages": _versions(),
            "python": sys.version.split()[0],
            "machine": _machine(),
            "start": _now(),
            "end": None,
        }
        write_json(self.path / "run.json", self._run)
        return self

    def finish(self, **extra) -> None:
        self._run.update(extra, end=_now())
        write_json(self.path / "run.json", self._run)

    def update_metrics(self, split: str, section: dict) -> dict:
        """Merge `section` into metrics.json[split] (retriever and reranker runs both write it)."""
        path = self.path / "metrics.json"
        metrics = json.loads(path.read_text()) if path.exists() else {}
        metrics.setdefault(split, {}).update(section)
        write_json(path, metrics)
        return metrics
