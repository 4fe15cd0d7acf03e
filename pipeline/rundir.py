"""Run directories (docs/design.md, "Run directories"): config.yaml, run.json (provenance), metrics.json, data files."""
from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.atomic import write_json, write_yaml
from pipeline.config import to_dict
from pipeline.data.fingerprint import changed_file, data_fingerprint
from pipeline.errors import PipelineError
from pipeline.run_files import CONFIG_YAML, METRICS_JSON, RUN_JSON

# Config keys a resumed run may change: how to continue, not what is computed. The analysis, overfit
# and probe sections are read by the analysis scripts, the learnability check and the state probe
# only (a comparison re-run with one more variant resumes its directory; each variant's own run
# directory is checked in full, and a finished reranker run made before a config grew a probe
# section is still that variant).
_RESUME_KEYS = {("reranker", "resume"), ("analysis",), ("overfit",), ("probe",)}

# Versions recorded in run.json: what decides the numbers a run produces.
_PACKAGES = ("torch", "transformers", "peft", "trl", "accelerate", "recbole", "numpy", "pandas")


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def git_commit() -> str | None:
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

    def check(self, cfg, resume: bool = False) -> None:
        """A fresh run needs a directory without a run in it (no config.yaml); a resumed run
        (`resume`) needs the config it was started with (reranker.resume aside)."""
        stored_path = self.path / CONFIG_YAML
        if not stored_path.is_file():
            return  # nothing there yet: a resumed run starts from scratch
        if not resume:
            raise PipelineError(f"{self.path} already holds a run: pass --resume to continue it, or choose a fresh --out")
        try:
            stored = yaml.safe_load(stored_path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            raise PipelineError(f"{stored_path} is not valid YAML: choose a fresh --out") from None
        want = yaml.safe_load(yaml.safe_dump(to_dict(cfg), sort_keys=False))  # lists, not tuples, as stored
        defaults = yaml.safe_load(yaml.safe_dump(to_dict(type(cfg)()), sort_keys=False))
        diff = _first_difference(stored, want, defaults)
        if diff is not None:
            key, old, new = diff
            raise PipelineError(
                f"{self.path} was run with another config ({key}: {old!r} there, {new!r} now): "
                "resume with the same --config and --set, or choose a fresh --out"
            )

    def start(self, cfg, argv: list[str] | None = None, resume: bool = False) -> "RunDir":
        """Write config.yaml and run.json. `resume`: continue the run already in the directory
        (same config, see `check`); run.json keeps its first start and lists each resume."""
        self.check(cfg, resume)
        # What was there before (`fail` removes what a failed fresh run added): the directories
        # this start creates (--out and missing parents, deepest first), or the entries of an
        # existing --out.
        if self.path.exists() and not self.path.is_dir():
            raise PipelineError(f"--out {self.path} is a file, not a directory: choose another --out")
        foreign = self._foreign_entry()
        if foreign is not None:  # refused before anything is written: never touch what is not ours
            raise PipelineError(
                f"--out {self.path} exists and is not a run directory of this project (it holds {foreign!r} and no run.json "
                "of ours): choose a fresh --out, or an empty directory"
            )
        data_files = data_fingerprint(cfg.data)
        previous = self._previous_run() if resume else None
        recorded = (previous or {}).get("data_files")
        if recorded:  # a resumed run: its finished stages were computed from the recorded files
            _check_same_data(recorded, data_files, f"{self.path} was run on other data")
        self._created = [d for d in (self.path, *self.path.parents) if not d.exists()]
        self._existing = set() if self._created else {p.name for p in self.path.iterdir()}
        self.path.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, *(sys.argv if argv is None else ["<api>", *argv])]
        self._resumed = previous is not None
        _STARTED.append(self)
        if previous is not None:
            self._run = {**previous, "end": None}
            self._run["resumes"] = [*previous.get("resumes", []), {"command": command, "start": _now()}]
            write_json(self.path / RUN_JSON, self._run)
            return self
        write_yaml(self.path / CONFIG_YAML, to_dict(cfg))
        self._run = {
            "command": command,
            "git_commit": git_commit(),
            "packages": _versions(),
            "python": sys.version.split()[0],
            "machine": _machine(),
            "data_files": data_files,  # content fingerprint of the raw data (--resume refuses changed files)
            "start": _now(),
            "end": None,
        }
        write_json(self.path / RUN_JSON, self._run)
        return self

    def _foreign_entry(self) -> str | None:
        """The first entry of an existing, non-empty --out that holds no run.json written by this
        project (`is_run_dir`), else None: such a folder is someone else's, and a run would
        overwrite or, failing, delete files in it."""
        if not self.path.is_dir() or is_run_dir(self.path):
            return None
        return next((p.name for p in sorted(self.path.iterdir())), None)

    def _previous_run(self) -> dict | None:
        """run.json of the run being resumed (None when there is none, or it is unreadable)."""
        path = self.path / RUN_JSON
        if not (self.path / CONFIG_YAML).is_file() or not path.is_file():
            return None
        try:
            run = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return None
        return run if isinstance(run, dict) else None

    def finish(self, **extra) -> None:
        self._run.update(extra, end=_now())
        write_json(self.path / RUN_JSON, self._run)
        if self in _STARTED:
            _STARTED.remove(self)

    def stage_finished(self, name: str) -> None:
        """Record in run.json that stage `name` (e.g. "retriever") finished: a later failure keeps it."""
        stages = self._run.setdefault("finished_stages", [])
        if name not in stages:
            stages.append(name)
        write_json(self.path / RUN_JSON, self._run)

    def fail(self, message: str) -> str | None:
        """The run stopped on bad input (`message`). A fresh run with no finished stage leaves no
        partial output, so the same command can be run again: a directory it created is removed with
        everything in it, and in an (empty) directory that existed it removes only what it added. A
        resumed run, or one with a finished stage (`stage_finished`: minutes of training), keeps
        everything and records the failure in run.json; then the returned note says what was kept
        and how to go on (None otherwise)."""
        if self in _STARTED:
            _STARTED.remove(self)
        finished = self._run.get("finished_stages") or []
        if self._resumed or finished:
            self._run.update(end=_now(), error=message)
            write_json(self.path / RUN_JSON, self._run)
            if finished and not self._resumed:
                return (
                    f"the finished stage(s) {', '.join(finished)} stay in {self.path}: after fixing the cause, rerun with --resume "
                    f"(same config), or start a fresh --out (train_reranker.py --set retriever_run={self.path} reuses its retriever)"
                )
            return None
        if self._created:
            shutil.rmtree(self.path, ignore_errors=True)
            for parent in self._created[1:]:  # parents it made, only while empty (another run may use them)
                try:
                    parent.rmdir()
                except OSError:
                    break
        else:
            for entry in self.path.iterdir():
                if entry.name not in self._existing:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        return None

    def update_metrics(self, split: str, section: dict) -> dict:
        """Merge `section` into metrics.json[split] (retriever and reranker runs both write it)."""
        path = self.path / METRICS_JSON
        metrics = json.loads(path.read_text()) if path.exists() else {}
        metrics.setdefault(split, {}).update(section)
        write_json(path, metrics)
        return metrics


def is_run_dir(path: str | Path) -> bool:
    """True when `path` holds a run.json that this project wrote (its provenance keys)."""
    try:
        run = json.loads((Path(path) / RUN_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(run, dict) and {"command", "packages", "start"} <= run.keys()


def check_same_data(run_dir: str | Path, cfg, what: str) -> None:
    """Stop when run `run_dir` (e.g. the retriever run whose candidates a reranker reads) recorded
    another content of the raw data files than `cfg.data` has now. Runs without a record (older
    ones) are accepted: their candidates are still checked item by item against the dataset."""
    path = Path(run_dir) / RUN_JSON
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("data_files") if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        recorded = None
    if recorded:
        _check_same_data(recorded, data_fingerprint(cfg.data), what)


def _check_same_data(recorded: dict, now: dict, what: str) -> None:
    name = changed_file(recorded, now)
    if name is not None:
        def short(d):
            return d[:12] if d else "missing"

        raise PipelineError(
            f"{what}: data file {name} changed since (sha256 {short(recorded.get(name))} then, {short(now.get(name))} now): "
            "restore that file, or start a fresh --out on the new data"
        )


# Runs started in this process and not finished yet, oldest first (`fail_started`).
_STARTED: list[RunDir] = []


def started_count() -> int:
    """How many runs are started and unfinished: `fail_started(message, since=...)` fails only
    those started after this count was taken."""
    return len(_STARTED)


def fail_started(message: str, since: int = 0) -> list[str]:
    """`RunDir.fail(message)` for every unfinished run started after `since` (newest first); their
    notes (what was kept). pipeline.cli.run_main calls it when a script stops on a PipelineError."""
    notes = [run.fail(message) for run in reversed(_STARTED[since:])]
    return [n for n in notes if n]


def _first_difference(stored, want, defaults=None, key: str = "") -> tuple[str, object, object] | None:
    """(dotted key, stored value, wanted value) of the first difference of two configs. A key the
    stored config lacks (the run predates it) is no difference while it is at its default (`defaults`,
    the config class's own): a new key's default keeps what the code computed before it existed."""
    if isinstance(stored, dict) and isinstance(want, dict):
        defaults = defaults if isinstance(defaults, dict) else {}
        for k in [*want, *(k for k in stored if k not in want)]:
            name = f"{key}.{k}" if key else str(k)
            if tuple(name.split(".")) in _RESUME_KEYS:
                continue
            if k not in stored and k in defaults and want.get(k) == defaults[k]:
                continue
            diff = _first_difference(stored.get(k), want.get(k), defaults.get(k), name)
            if diff is not None:
                return diff
        return None
    return None if stored == want else (key, stored, want)
