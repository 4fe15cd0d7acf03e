"""scripts/run_table1.py: the commands it runs (dry run: nothing is trained)."""
import json
import shlex
import sys

from tests.helpers.scripts import run_script


def test_dry_run_lists_every_retriever_seed_the_reranker_and_the_tables(tmp_path):
    out = tmp_path / "t1"
    proc = run_script("scripts/run_table1.py", "--out", str(out), "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    cmds = [shlex.split(line[2:]) for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert all(c[0] == sys.executable for c in cmds)
    scripts = [c[1] for c in cmds]
    # pop once (no randomness), the five others for seeds 0 1 2, a reranker per LRURec seed, the tables
    assert scripts == ["scripts/train_retriever.py"] * 16 + ["scripts/train_reranker.py"] * 3 + ["scripts/reproduce_tables.py"]
    runs = [c[c.index("--out") + 1] for c in cmds[:-1]]
    names = ["pop"] + [f"{m}_seed{k}" for m in ("gru4rec", "narm", "bert4rec", "sasrec", "lrurec") for k in (0, 1, 2)]
    assert runs == [str(out / n) for n in names + [f"rerank_lrurec_seed{k}" for k in (0, 1, 2)]]
    sasrec1 = cmds[names.index("sasrec_seed1")]
    assert sasrec1[2:4] == ["--config", "configs/retrieval/sasrec_ml-100k.yaml"] and "seed=1" in sasrec1 and "--resume" in sasrec1
    # the LRURec runs write the per-prefix candidates the reranker config trains on (default.yaml: 20)
    lru2 = cmds[names.index("lrurec_seed2")]
    assert "retriever.prefix_candidates=20" in lru2 and "retriever.prefix_candidates=20" not in sasrec1
    rerank1 = cmds[17]
    assert rerank1[2:4] == ["--config", "configs/experiments/default.yaml"]
    assert f"retriever_run={out / 'lrurec_seed1'}" in rerank1 and "seed=1" in rerank1
    tables = cmds[-1]
    assert tables[tables.index("--runs") + 1 : tables.index("--out")] == runs and tables[-1] == str(out / "tables")
    assert not out.exists()  # a dry run writes nothing


def test_no_reranker_and_bad_reranker_seeds(tmp_path):
    proc = run_script("scripts/run_table1.py", "--out", str(tmp_path), "--seeds", "3", "--retrievers", "sasrec", "pop",
                      "--no-reranker", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("$ ")]
    assert len(lines) == 3 and "sasrec_seed3" in lines[0] and f"{tmp_path / 'pop'} " in lines[1]
    assert "train_reranker" not in proc.stdout
    proc = run_script("scripts/run_table1.py", "--out", str(tmp_path), "--seeds", "0", "--reranker-seeds", "1", "--dry-run")
    assert proc.returncode != 0 and "--reranker-seeds [1] have no LRURec run" in proc.stderr


def test_finished_runs_are_kept_untouched_and_tabulated(tmp_path):
    """A finished run (run.json with an end, no error) is not started again: its run.json, which
    times the run, stays as it was; the tables are made over it. An unfinished one would be run."""
    from tests.helpers.runs import write_run

    out = tmp_path / "t1"
    pop = write_run(out / "pop", retriever="pop")
    stamp = json.dumps({"start": "2026-01-01T00:00:00+00:00", "end": "2026-01-01T00:00:05+00:00"})
    (pop / "run.json").write_text(stamp)
    proc = run_script("scripts/run_table1.py", "--out", str(out), "--retrievers", "pop", "--no-reranker")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"kept finished run {pop}" in proc.stdout and "train_retriever.py" not in proc.stdout
    assert (pop / "run.json").read_text() == stamp
    assert "| Popularity | 1 | – |" in (out / "tables" / "convergence.md").read_text()
    (pop / "run.json").write_text(json.dumps({"start": "2026-01-01T00:00:00+00:00", "end": None}))  # killed
    proc = run_script("scripts/run_table1.py", "--out", str(out), "--retrievers", "pop", "--no-reranker", "--dry-run")
    assert f"train_retriever.py --config configs/retrieval/pop_ml-100k.yaml --out {pop}" in proc.stdout
