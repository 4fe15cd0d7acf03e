"""Running a script's main() in-process on a tiny dataset, for the bad-input checks."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from pipeline.cli import run_main
from tests.helpers.scripts import REPO


def tiny_data(root: Path) -> Path:
    root.mkdir(parents=True)
    rows = [(u, (u * 7 + k * 5) % 30 + 1, 100 + k) for u in range(1, 9) for k in range(6)]
    (root / "interactions.csv").write_text("user,item,timestamp\n" + "".join(f"{u},{i},{t}\n" for u, i, t in rows))
    (root / "items.csv").write_text("item,title\n" + "".join(f"{i},Item number {i}\n" for i in range(1, 31)))
    return root


def script_args(tmp_path: Path, sets: list[str]) -> list[str]:
    return ["--config", str(_config(tmp_path)), "--out", str(tmp_path / "out"), *[x for s in sets for x in ("--set", s)]]


def run_in_process(script: str, argv: list[str], capfd) -> tuple[int, str]:
    """(exit code, stderr) of scripts/<script>.py's main under run_main, in this process."""
    main = runpy.run_path(str(REPO / "scripts" / f"{script}.py"), run_name="bad_input_test")["main"]
    capfd.readouterr()
    with pytest.raises(SystemExit) as code:
        run_main(main, argv)
    return code.value.code, capfd.readouterr().err


def _config(tmp_path: Path) -> Path:
    cfg = {
        "data": {"dataset": "generic", "path": str(tmp_path / "data"), "cache_dir": str(tmp_path / "cache"),
                 "min_user_count": 3, "min_item_count": 1},
        "retriever": {"model": "pop"},
        "reranker": {"model_cache_dir": str(REPO / ".cache" / "models"), "max_train_samples": 4, "train_batch_size": 4,
                     "eval_steps": 1, "warmup_steps": 0, "val_max_users": 4},
    }
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(cfg))  # JSON is YAML
    return path
