"""A run is one dataset, and never touches what is not ours: the item catalogue's integrity, the
preprocessing cache keyed on content, --resume on changed data, --out folders of someone else,
finished stages kept when a later step fails."""
from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

from pipeline.cli import run_main
from pipeline.config import DataConfig, load_config
from pipeline.data import load_dataset
from pipeline.errors import PipelineError
from pipeline.rundir import RunDir, check_same_data
from tests.helpers.data import TITLES, write_amazon, write_generic


def _cfg(tmp_path: Path, root: Path) -> DataConfig:
    return DataConfig(dataset="generic", path=str(root), cache_dir=str(tmp_path / "cache"))


def test_an_item_id_with_two_titles_is_an_error_naming_both_lines(tmp_path):
    root = write_generic(tmp_path / "g")
    with open(root / "items.csv", "a") as f:
        f.write('3,"Another film"\n')  # item 3 is on line 4 already (header = line 1)
    last = len(TITLES) + 2
    # Before: the later title won silently.
    with pytest.raises(PipelineError, match=rf"item '3' has two different titles, 'Movie 3' on line 4 and 'Another film' on line {last}: keep one"):
        load_dataset(_cfg(tmp_path, root))


def test_identical_duplicates_and_whitespace_are_repaired_and_counted(tmp_path, capsys):
    root = write_generic(tmp_path / "g", titles={**TITLES, "5": "  Five   Stars "})
    with open(root / "items.csv", "a") as f:
        f.write('2,"Movie 2"\n')  # the same title again: dropped, counted
    ds = load_dataset(_cfg(tmp_path, root))
    assert ds.stats["repairs"] == {"duplicate_item_rows": 1, "titles_whitespace_cleaned": 1, "ids_whitespace_trimmed": 0}
    assert ds.titles[ds.item_ids.index("5")] == "Five Stars"
    assert "1 item rows repeating an id with the same title (dropped)" in capsys.readouterr().out


def test_an_amazon_asin_with_two_titles_names_both_meta_lines(tmp_path):
    root = write_amazon(tmp_path / "a")
    with gzip.open(root / "meta_Beauty.json.gz", "at", encoding="utf-8") as f:
        f.write(repr({"asin": "B001", "title": "Not One"}) + "\n")
    last = len(TITLES) + 2  # the records, the untitled one, this one
    with pytest.raises(PipelineError, match=rf"item 'B001' has two different titles, 'Movie 1' on line 1 and 'Not One' on line {last}"):
        load_dataset(DataConfig(dataset="amazon", path=str(root), category="Beauty", cache_dir=str(tmp_path / "cache")))


def test_the_cache_is_keyed_on_content_not_size_and_mtime(tmp_path):
    root = write_generic(tmp_path / "g")
    cfg = _cfg(tmp_path, root)
    assert load_dataset(cfg).titles[1] == "Movie 1"
    items = root / "items.csv"
    st = items.stat()
    items.write_text(items.read_text().replace('"Movie 1"', '"Films 1"'))  # same size
    os.utime(items, ns=(st.st_atime_ns, st.st_mtime_ns))  # and the old mtime restored
    assert items.stat().st_size == st.st_size and items.stat().st_mtime_ns == st.st_mtime_ns
    assert load_dataset(cfg).titles[1] == "Films 1"  # before: the cached "Movie 1"


def _data_run(tmp_path: Path, root: Path) -> tuple[RunDir, object]:
    cfg = load_config(None, [f"data.dataset=generic", f"data.path={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    return RunDir(tmp_path / "run").start(cfg, argv=[]), cfg


def test_resume_on_changed_data_names_the_file(tmp_path):
    root = write_generic(tmp_path / "g")
    run, cfg = _data_run(tmp_path, root)
    assert set(json.loads((run / "run.json").read_text())["data_files"]) == {"interactions.csv", "items.csv"}
    RunDir(run.path).start(cfg, argv=[], resume=True)  # unchanged data: resumes
    (root / "items.csv").write_text((root / "items.csv").read_text().replace('"Movie 2"', '"Film 2"'))
    before = (run / "run.json").read_text()
    with pytest.raises(PipelineError, match=r"run was run on other data: data file items.csv changed since .*restore that file, or start a fresh --out"):
        RunDir(run.path).start(cfg, argv=[], resume=True)
    assert (run / "run.json").read_text() == before  # refused before anything was written
    # A reranker reading this run's candidates from another run is refused the same way.
    with pytest.raises(PipelineError, match="data file items.csv changed"):
        check_same_data(run.path, cfg, "the candidates in run were made from other data")


def test_an_out_folder_that_is_not_ours_is_refused_before_anything_is_written(tmp_path, capfd):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "metrics.json").write_text('{"my": "results"}')

    def main(argv):
        RunDir(out).start(load_config(None), argv=[])

    with pytest.raises(SystemExit):
        run_main(main, [])
    assert "is not a run directory of this project (it holds 'metrics.json'" in capfd.readouterr().err
    assert [p.name for p in out.iterdir()] == ["metrics.json"] and (out / "metrics.json").read_text() == '{"my": "results"}'
    RunDir(tmp_path / "empty").start(load_config(None), argv=[])  # an empty folder is fine
    (tmp_path / "empty2").mkdir()
    RunDir(tmp_path / "empty2").start(load_config(None), argv=[])


def test_a_failure_after_a_finished_stage_keeps_it_and_says_how_to_go_on(tmp_path, capfd):
    out = tmp_path / "run"

    def main(argv):
        run = RunDir(out).start(load_config(None), argv=[])
        (run / "candidates_val.jsonl").write_text("{}\n")
        run.stage_finished("retriever")
        (run / "checkpoints").mkdir()
        raise PipelineError("late failure: fix it")

    with pytest.raises(SystemExit) as code:
        run_main(main, [])
    assert code.value.code == 2
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: late failure: fix it ; the finished stage(s) retriever stay in")
    assert {"candidates_val.jsonl", "checkpoints", "run.json", "config.yaml"} <= {p.name for p in out.iterdir()}
    run = json.loads((out / "run.json").read_text())
    assert run["error"] == "late failure: fix it" and run["finished_stages"] == ["retriever"]
    RunDir(out).start(load_config(None), argv=[], resume=True)  # the note's --resume is accepted


def test_a_column_named_twice_is_a_one_line_error(tmp_path):
    # Before: a Python traceback (pandas returned a frame for the column name) and a half-written run.
    root = write_generic(tmp_path / "g")
    text = (root / "items.csv").read_text().splitlines()
    (root / "items.csv").write_text("\n".join(["item,title,title"] + [f"{line},x" for line in text[1:]]) + "\n")
    with pytest.raises(PipelineError, match=r"items.csv line 1 names column 'title' twice: keep one column of each name"):
        load_dataset(_cfg(tmp_path, root))
