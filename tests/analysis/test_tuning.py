"""The retriever tuning grid (analysis/tuning.py, scripts/tune_retriever.py): the points, the choice on
validation (hand-built finished runs), and the next stage's commands; no training here."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

from analysis import tuning
from pipeline.config import load_config
from pipeline.run_files import RETRIEVER_SUMMARY
from tests.helpers.scripts import REPO


def _finish(out: Path, model: str, point: tuning.Point, val: float, seed: int = 0) -> None:
    run = tuning.run_dir(out, model, point, seed)
    run.mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"start": "t0", "end": "t1"}))
    (run / RETRIEVER_SUMMARY).write_text(json.dumps({tuning.VAL_KEY: val, "best_epoch": 3, "epochs_run": 8, "train_seconds": 1.0}))


def test_points_are_valid_configs_and_the_optimisers_differ_as_asked():
    base = tuning.base_point("sasrec", REPO)
    s1 = tuning.stage1(base)
    assert [(p.batch_size, p.optimizer) for p in s1] == [(16, "adamw"), (16, "adam"), (64, "adamw"), (64, "adam")]
    adam = load_config(REPO / tuning.config_path("sasrec"), s1[1].overrides()).retriever
    assert (adam.optimizer, adam.weight_decay, adam.grad_clip, adam.batch_size) == ("adam", 0.0, None, 16)
    adamw = load_config(REPO / tuning.config_path("sasrec"), s1[2].overrides()).retriever
    assert (adamw.optimizer, adamw.weight_decay, adamw.grad_clip) == ("adamw", 0.01, 5.0)
    s2 = tuning.stage2(s1[3])
    assert len(s2) == 6 and {(p.dropout, p.lr) for p in s2} == {(d, lr) for d in (0.1, 0.2, 0.5) for lr in (1e-3, 3e-4)}
    assert all(p.batch_size == 64 and p.optimizer == "adam" for p in s2)
    assert len({p.name for p in s1 + s2}) == len(s1 + s2) - (s1[3] in s2)  # a shared point is one run


def test_the_best_validation_point_is_chosen_and_stage_2_starts_from_it(tmp_path, capsys):
    out = tmp_path / "tune"
    s1 = tuning.stage1(tuning.base_point("sasrec", REPO))
    with pytest.raises(ValueError, match="unfinished grid points"):
        tuning.best_point(s1, out, "sasrec")
    for p, val in zip(s1, [0.100, 0.108, 0.104, 0.108]):  # a tie: the earlier point wins
        _finish(out, "sasrec", p, val)
    assert tuning.best_point(s1, out, "sasrec") == s1[1]
    main = runpy.run_path(str(REPO / "scripts" / "tune_retriever.py"), run_name="tuning_test")["main"]
    main(["--model", "sasrec", "--out", str(out), "--dry-run"])
    printed = capsys.readouterr().out
    assert "stage 1: best bs16_adam_do0.2_lr0.001 (val NDCG@10 0.1080)" in printed
    stage2 = [line for line in printed.splitlines() if line.startswith("$ ")]
    assert len(stage2) == 5  # 6 points, one of them stage 1's winner (finished, kept)
    assert all("retriever.batch_size=16" in c and "retriever.optimizer=adam" in c and "retriever.grad_clip=null" in c for c in stage2)
    table = (out / "sasrec" / "grid.md").read_text()
    assert "| 1 | 16 | adam | 0.2 | 0.001 | 0.1080 |" in table and "| 1 | 64 | adamw | 0.2 | 0.001 | 0.1040 |" in table
