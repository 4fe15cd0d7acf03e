"""scripts/reproduce_tables.py and analysis/{tables,significance,paper}.py against hand-computed values.

The hand-built runs: four test users; the retriever ranks the targets of u1, u2, u3 at 2, 1, 3 among
their candidates and misses u4's; the reranker ranks them at 1, 2, 1."""
import importlib.util
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from analysis import paper
from analysis.significance import bootstrap_means, paired_tests, paired_user_values
from analysis.plots import retriever_curves_figure
from analysis.tables.build import build_tables, relative_improvement
from analysis.tables.convergence import seed_summaries
from analysis.tables.group import not_run
from analysis.tables.render import OUTPUT_FILES, render, write_outputs
from pipeline.errors import PipelineError
from pipeline.metrics import metrics_from_ranks, per_user_metrics
from tests.helpers.png import png_size
from tests.helpers.runs import L3, L4, RER, RET, ROWS, section, write_run
from tests.helpers.scripts import REPO, run_script


@pytest.fixture
def runs(tmp_path):
    """A retriever run and a train_reranker.py run on its candidates (whose own config names
    another retriever: the tables must take the model from retriever_run)."""
    lru = write_run(tmp_path / "lru")
    rr = write_run(tmp_path / "rr", retriever="sasrec", reranker="tiny-qwen2", candidates=False, retriever_run=str(lru))
    return lru, rr


def test_per_user_metrics_hand_computed_and_shared_with_means():
    v = per_user_metrics([1, 3, None, 12], ks=[5, 10])
    assert v["NDCG@5"] == [1.0, 0.5, 0.0, 0.0]
    assert v["MRR@5"] == pytest.approx([1.0, 1 / 3, 0.0, 0.0])
    assert v["Recall@10"] == [1.0, 1.0, 0.0, 0.0]
    assert list(v) == ["NDCG@5", "Recall@5", "MRR@5", "NDCG@10", "Recall@10", "MRR@10"]
    means = metrics_from_ranks([1, 3, None, 12], ks=[5, 10])
    assert means == {k: sum(x) / 4 for k, x in v.items()}


def test_table1_rows_values_and_published_numbers(runs):
    lru, rr = runs
    t = build_tables([lru, rr], n_resamples=200)
    t1 = t.table1.set_index("method")
    # paper rows first (NARM, BERT4Rec, SASRec not run), one LRURec row (the reranker's retriever_run
    # is the LRURec run, so it adds no second row), then the reranker
    assert list(t1.index) == ["NARM", "BERT4Rec", "SASRec", "LRURec", "LLM reranker (tiny-qwen2, letters) on LRURec"]
    assert list(t1["kind"]) == ["not run"] * 3 + ["retriever", "reranker"]
    assert not_run(t.groups[0]) == ["NARM", "BERT4Rec", "SASRec"]
    assert t1.loc["LRURec", "run"] == str(lru)
    assert t1.loc["LRURec", "NDCG@10"] == pytest.approx((1 / L3 + 1 + 0.5) / 4)
    assert t1.loc["LRURec", "MRR@5"] == pytest.approx((0.5 + 1 + 1 / 3) / 4)
    assert t1.loc["LLM reranker (tiny-qwen2, letters) on LRURec", "NDCG@10"] == pytest.approx((2 + 1 / L3) / 4)
    assert t1.loc["LRURec", "users"] == 4
    assert math.isnan(t1.loc["NARM", "NDCG@10"])
    # published: LRURec -> LlamaRec on the paper's ML-100k, @10 only
    assert t1.loc["LRURec", "paper NDCG@10"] == 0.0705
    assert t1.loc["LLM reranker (tiny-qwen2, letters) on LRURec", "paper Recall@10"] == 0.1524
    assert t1.loc["LLM reranker (tiny-qwen2, letters) on LRURec", "paper MRR@10"] == 0.0529
    assert math.isnan(t1.loc["LRURec", "paper NDCG@5"])


def test_table3_relative_improvement_and_paper_row(runs):
    t = build_tables(list(runs), n_resamples=200)
    t3 = t.table3.set_index("metric")
    assert t3.loc["NDCG@10", "retriever"] == pytest.approx((1 / L3 + 1.5) / 3)
    assert t3.loc["NDCG@10", "reranker"] == pytest.approx((2 + 1 / L3) / 3)
    # (2 + 1/L3 - 1.5 - 1/L3) / (1.5 + 1/L3): the reranker gains 0.5 of NDCG sum
    assert t3.loc["NDCG@10", "improvement %"] == pytest.approx(0.5 / (1.5 + 1 / L3) * 100)
    assert t3.loc["MRR@10", "improvement %"] == pytest.approx((2.5 - 11 / 6) / (11 / 6) * 100)  # 36.36%
    assert t3.loc["Recall@10", "improvement %"] == 0.0
    assert t3.loc["NDCG@10", "paper improvement %"] == pytest.approx((0.3766 - 0.3367) / 0.3367 * 100)
    assert t3.loc["NDCG@10", "n_covered"] == 3 and t3.loc["NDCG@10", "coverage"] == 0.75
    assert math.isnan(t3.loc["MRR@10", "paper retriever"])  # not in our sources
    assert relative_improvement(0.0, 0.5) is None


def test_markdown_and_csv(runs, tmp_path):
    lru, rr = runs
    texts = write_outputs(build_tables([lru, rr], n_resamples=200), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(texts)
    t1 = texts["table1.md"]
    cells = " | ".join(f"{v:.4f} / {p}" for v, p in [
        ((0.5 + 1 + 1 / 3) / 4, "–"), ((1 / L3 + 1.5) / 4, "–"), (0.75, "–"),
        ((0.5 + 1 + 1 / 3) / 4, "0.0491"), ((1 / L3 + 1.5) / 4, "0.0705"), (0.75, "0.1426")])
    assert f"| LRURec | lru | 4 | {cells} |" in t1
    assert "| NARM | not run | – | – / – |" in t1
    assert "Not run: NARM, BERT4Rec, SASRec" in t1
    assert "classic MovieLens 100K (943 users" in t1 and "ml-latest-small (610 users)" in t1
    assert paper.PAPER_URL in t1
    t3 = texts["table3.md"]
    ndcg = f"{(1.5 + 1 / L3) / 3:.4f} → {(2 + 1 / L3) / 3:.4f} (+{0.5 / (1.5 + 1 / L3) * 100:.1f}%)"
    assert ndcg in t3 and "| rr | 3/4 (75.0%) |" in t3
    assert "| paper: LRURec → LlamaRec | – | – | – | – | – | – | 0.3367 → 0.3766 (+11.9%) | 0.6654 → 0.7560 (+13.6%) |" in t3
    csv_lines = texts["table1.csv"].splitlines()
    assert csv_lines[0].startswith("dataset,paper dataset,split,method,kind,run,users,MRR@5,NDCG@5,Recall@5,MRR@10")
    lru_line = next(line for line in csv_lines if ",LRURec,retriever," in line)
    assert f",{lru},4,{(0.5 + 1 + 1 / 3) / 4!r}," in lru_line and lru_line.endswith(",0.0491,0.0705,0.1426")
    assert "Significance" in texts["tables.md"] and "Table 3" in texts["tables.md"]


def test_significance_identical_rankings_give_exactly_zero(tmp_path):
    same = [{**r, "scores": [3.0, 2.0, 1.0], "label_scheme": "letters"} for r in ROWS[:3]]
    metrics = {"test": {"retriever": section(RET, 4), "retriever_subset": section(RET, 3), "subset": section(RET, 3),
                        "overall": section(RET, 4), "coverage": 0.75, "n_users": 4, "n_covered": 3}}
    run = write_run(tmp_path / "same", reranker="tiny-qwen2", rankings=same, metrics=metrics)
    sig = build_tables([run], n_resamples=500).significance
    assert len(sig) == 6 and set(sig["scope"]) == {"subset", "overall"}
    assert (sig["mean_diff"] == 0).all() and (sig["ci_low"] == 0).all() and (sig["ci_high"] == 0).all()
    assert not sig["excludes_zero"].any() and (sig["p_bootstrap"] == 1.0).all()
    assert sig["t"].isna().all()  # constant differences: the t statistic is undefined
    assert list(sig[sig["scope"] == "overall"]["n"]) == [4, 4, 4]


def test_significance_target_always_first_is_positive():
    # 40 covered users with the target at retriever rank 2..5, reranked to 1; 10 uncovered users
    rows = [{"user": f"u{i}", "candidates": ["a", "b", "c", "d", "e"], "target": "abcde"[1 + i % 4],
             "scores": [1.0 if c == "abcde"[1 + i % 4] else 0.0 for c in "abcde"]} for i in range(40)]
    values = paired_user_values(rows, n_users=50, ks=[10])
    assert values["overall"]["reranker"]["Recall@10"].tolist() == [1.0] * 40 + [0.0] * 10
    res = paired_tests(values["subset"]["retriever"], values["subset"]["reranker"], ["NDCG@10", "MRR@10", "Recall@10"], 2000, 0)
    for m in ("NDCG@10", "MRR@10"):
        assert res[m].ci_low > 0 and res[m].excludes_zero and res[m].p_bootstrap == pytest.approx(1 / 2001)
        assert res[m].p_ttest < 1e-6
    # MRR gain per user: 1 - 1/r for r = 2, 3, 4, 5, ten users each
    assert res["MRR@10"].mean_diff == pytest.approx(np.mean([1 - 1 / r for r in (2, 3, 4, 5)]))
    assert res["Recall@10"].mean_diff == 0.0 and not res["Recall@10"].excludes_zero
    overall = paired_tests(values["overall"]["retriever"], values["overall"]["reranker"], ["MRR@10"], 2000, 0)
    assert overall["MRR@10"].mean_diff == pytest.approx(res["MRR@10"].mean_diff * 40 / 50)
    assert overall["MRR@10"].n == 50


def test_bootstrap_hand_cases_and_seed():
    # d = [1, 0]: a resample's mean is 0 (p = 1/4), 0.5 or 1 (p = 1/4): the 95% interval is [0, 1]
    res = paired_tests({"m": np.array([0.0, 0.0])}, {"m": np.array([1.0, 0.0])}, ["m"], 10_000, 0)["m"]
    assert (res.mean_diff, res.ci_low, res.ci_high, res.excludes_zero) == (0.5, 0.0, 1.0, False)
    d = np.arange(12.0).reshape(6, 2)
    assert np.array_equal(bootstrap_means(d, 300, seed=1), bootstrap_means(d, 300, seed=1))
    assert not np.array_equal(bootstrap_means(d, 300, seed=1), bootstrap_means(d, 300, seed=2))
    assert bootstrap_means(d, 300, seed=1).shape == (300, 2)
    # paired t-test: differences 1, 2, 3, 4 -> t = 2.5 / (sqrt(5/3) / 2)
    pytest.importorskip("scipy")
    t = paired_tests({"m": np.zeros(4)}, {"m": np.array([1.0, 2.0, 3.0, 4.0])}, ["m"], 100, 0)["m"].t
    assert t == pytest.approx(2.5 / (math.sqrt(5 / 3) / 2))


def test_groups_by_dataset_and_paper_match(tmp_path):
    small = write_run(tmp_path / "small", data={"dataset": "ml-latest-small", "path": "/d/mls"})
    games = write_run(tmp_path / "games", data={"dataset": "amazon", "path": "/d/a", "category": "Video_Games"})
    mine = write_run(tmp_path / "mine", data={"dataset": "generic", "path": "/d/g"})
    t = build_tables([small, games, mine], n_resamples=100)
    assert [g.label for g in t.groups] == ["ml-latest-small = the paper's ML-100k", "amazon Video_Games = the paper's Games",
                                           "generic (/d/g)"]
    assert [g.match.paper_dataset for g in t.groups] == ["ML-100k", "Games", None]
    assert all(not g.match.notes for g in t.groups)
    lru = t.table1[t.table1["method"] == "LRURec"].set_index("dataset")
    assert lru.loc["ml-latest-small = the paper's ML-100k", "paper NDCG@10"] == 0.0705
    assert math.isnan(lru.loc["amazon Video_Games = the paper's Games", "paper NDCG@10"])  # not in our sources
    md = render(t)["table1.md"]
    assert "Not one of the paper's datasets" in md and "| Method | Run | Users | MRR@5 | NDCG@5 |" in md
    assert t.table3.empty and t.significance.empty
    assert paper.match_dataset({"dataset": "ml-100k", "max_users": 60}).notes[1] == (
        "data.max_users=60: a slice of the first 60 users, not the whole dataset")


@pytest.mark.parametrize("breakage, message", [
    ("no_config", "is not a run directory (no config.yaml)"),
    ("no_metrics", "has no metrics.json"),
    ("no_test", "has no 'test' split"),
    ("no_rankings", "has reranker metrics but no rankings_test.jsonl"),
    ("stale_rankings", "has 2 users but metrics.json says 3 covered"),
    ("twice", "is given twice"),
])
def test_bad_runs_are_one_line_errors(tmp_path, breakage, message):
    run = write_run(tmp_path / "r", reranker="tiny-qwen2")
    paths = [run]
    if breakage == "no_config":
        (run / "config.yaml").unlink()
    elif breakage == "no_metrics":
        (run / "metrics.json").unlink()
    elif breakage == "no_test":
        (run / "metrics.json").write_text(json.dumps({"val": json.loads((run / "metrics.json").read_text())["val"]}))
    elif breakage == "no_rankings":
        (run / "rankings_test.jsonl").unlink()
    elif breakage == "stale_rankings":
        lines = (run / "rankings_test.jsonl").read_text().splitlines()
        (run / "rankings_test.jsonl").write_text("\n".join(lines[:2]) + "\n")
    else:
        paths = [run, tmp_path / "." / "r"]
    with pytest.raises(PipelineError, match=re.escape(message)):
        build_tables(paths, n_resamples=10)


def test_script_bad_run_exits_2_and_writes_nothing(tmp_path):
    good = write_run(tmp_path / "good")
    (tmp_path / "notes").mkdir()
    proc = run_script("scripts/reproduce_tables.py", "--runs", str(good), str(tmp_path / "notes"), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'notes'} is not a run directory (no config.yaml): pass directories written by "
        "train_retriever.py, train_reranker.py or run_experiment.py"]
    assert not (tmp_path / "out").exists()


def test_out_inside_a_run_is_refused(tmp_path):
    run = write_run(tmp_path / "r")
    spec = importlib.util.spec_from_file_location("reproduce_tables", REPO / "scripts" / "reproduce_tables.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    with pytest.raises(PipelineError, match="is inside run directory"):
        script.main(["--runs", str(run), "--out", str(run / "tables")])
    assert not (run / "tables").exists()


def test_smoke_run_tables(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    out = tmp_path / "tables"
    proc = run_script("scripts/reproduce_tables.py", "--runs", str(run_dir), "--out", str(out), "--resamples", "2000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.iterdir()) == sorted([*OUTPUT_FILES, "retriever_curves.png"])  # the script adds the PNG
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # read only
    test = json.loads((run_dir / "metrics.json").read_text())["test"]
    t1 = (out / "table1.md").read_text()
    ret = test["retriever"]
    assert f"| LRURec | {run_dir.name} | {test['n_users']} | {ret['MRR@5']:.4f} / – |" in t1
    assert f"{test['overall']['NDCG@10']:.4f} / 0.0759" in t1
    assert "data.max_users=60" in t1 and "Not run: NARM, BERT4Rec, SASRec" in t1
    sig = json.loads((out / "significance.json").read_text())
    assert sig["bootstrap"]["resamples"] == 2000 and sig["paper"]["url"] == paper.PAPER_URL
    by = {(r["scope"], r["metric"]): r for r in sig["tests"]}
    assert {r["n"] for (scope, _), r in by.items() if scope == "subset"} == {test["n_covered"]}
    for m in ("NDCG@10", "Recall@10", "MRR@10"):
        assert by[("subset", m)]["mean_diff"] == pytest.approx(test["subset"][m] - test["retriever_subset"][m])
        assert by[("overall", m)]["mean_diff"] == pytest.approx(test["overall"][m] - test["retriever"][m])
        assert by[("overall", m)]["ci_low"] <= by[("overall", m)]["mean_diff"] <= by[("overall", m)]["ci_high"]
    t3 = (out / "table3.csv").read_text().splitlines()
    assert len(t3) == 1 + 6  # one row per table metric
    summary = json.loads((run_dir / "retriever_summary.json").read_text())
    conv = (out / "convergence.md").read_text()  # a run_experiment.py run: no retriever-only wall time
    assert f"| LRURec | 1 | {summary['epochs_run']:.1f} | {summary['best_epoch']:.1f} | {summary['best_val_NDCG@10']:.4f} |" in conv
    assert f"| {summary['train_seconds']:.0f} | – | {ret['NDCG@10']:.4f} | {ret['Recall@20']:.4f} |" in conv


# --- several seeds per method -------------------------------------------------------------------


def _set_config(path: Path, **updates) -> Path:
    cfg = yaml.safe_load((path / "config.yaml").read_text())
    for key, value in updates.items():
        if isinstance(value, dict):
            cfg[key] = {**cfg.get(key, {}), **value}
        else:
            cfg[key] = value
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    return path


def _flat(value: float) -> dict:
    return {f"{m}@{k}": value for k in (1, 5, 10, 20) for m in ("NDCG", "Recall", "MRR")}


@pytest.fixture
def seed_runs(tmp_path):
    """LRURec seeds 0, 1, 2 (all-user metrics 0.1, 0.2, 0.3), a train_reranker.py run on each
    (seed k on LRURec seed k; overall 0.30, 0.40, 0.35; seed 1 keeps the retriever's order, so its
    covered-user metrics are the retriever's), and an LRURec run with another hidden size."""
    lrus, rrs = [], []
    for k, (ret, overall) in enumerate([(0.1, 0.30), (0.2, 0.40), (0.3, 0.35)]):
        test = {"retriever": _flat(ret), "coverage": 0.75, "n_users": 4, "n_covered": 3}
        lru = write_run(tmp_path / f"lrurec_seed{k}", metrics={"val": test, "test": test})
        lrus.append(_set_config(lru, seed=k, retriever={"model": "lrurec", "hidden": 64}))
        subset = section(RET, 3) if k == 1 else section(RER, 3)
        rankings = ([{**r, "label_scheme": "letters"} for r in ROWS[:3]] if k == 1 else None)  # retriever order
        rr_test = {"retriever": _flat(ret), "retriever_subset": section(RET, 3), "subset": subset, "overall": _flat(overall),
                   "coverage": 0.75, "n_users": 4, "n_covered": 3}
        rr = write_run(tmp_path / f"rerank_seed{k}", reranker="tiny-qwen2", candidates=False, retriever_run=str(lru),
                       rankings=rankings, metrics={"val": rr_test, "test": rr_test})
        rrs.append(_set_config(rr, seed=k, reranker={"model": "tiny-qwen2", "label_scheme": "letters", "resume": k == 2}))
    test = {"retriever": _flat(0.5), "coverage": 0.75, "n_users": 4, "n_covered": 3}
    wide = _set_config(write_run(tmp_path / "lrurec_h128", metrics={"val": test, "test": test}),
                       retriever={"model": "lrurec", "hidden": 128})
    return lrus, rrs, wide


def test_seeds_of_a_method_are_one_row_with_mean_and_std(seed_runs, tmp_path):
    lrus, rrs, wide = seed_runs
    t = build_tables([*lrus, wide, *rrs], n_resamples=100)
    t1 = t.table1
    lru = t1[t1["method"] == "LRURec"]
    assert len(lru) == 2  # seeds 0-2 in one row; hidden 128 is another method
    three = lru[lru["n"] == 3].iloc[0]
    assert three["NDCG@10"] == pytest.approx(0.2) and three["NDCG@10 std"] == pytest.approx(0.1)  # 0.1, 0.2, 0.3
    assert three["run"] == ";".join(str(p) for p in lrus) and three["users"] == 4
    one = lru[lru["n"] == 1].iloc[0]
    assert one["NDCG@10"] == 0.5 and math.isnan(one["NDCG@10 std"]) and one["run"] == str(wide)
    # the convergence table names the two LRURec rows by the setting in which they differ
    assert t.convergence["method"].tolist()[:2] == ["LRURec (hidden=64)", "LRURec (hidden=128)"]
    rer = t1[t1["kind"] == "reranker"]
    assert len(rer) == 1 and rer.iloc[0]["n"] == 3  # `resume` differs, but it is bookkeeping
    assert rer.iloc[0]["MRR@5"] == pytest.approx(0.35) and rer.iloc[0]["MRR@5 std"] == pytest.approx(0.05)  # 0.30, 0.40, 0.35

    # Table 3: subset NDCG@10 a, b, a (a: reranker, b: retriever order): mean (2a + b) / 3, std |a - b| / sqrt(3)
    a, b = (2 + 1 / L3) / 3, (1 / L3 + 1 + 1 / L4) / 3
    t3 = t.table3.set_index("metric")
    assert t3.loc["NDCG@10", "n"] == 3
    assert t3.loc["NDCG@10", "reranker"] == pytest.approx((2 * a + b) / 3)
    assert t3.loc["NDCG@10", "reranker std"] == pytest.approx(abs(a - b) / math.sqrt(3))
    assert t3.loc["NDCG@10", "retriever"] == pytest.approx(b) and t3.loc["NDCG@10", "retriever std"] == pytest.approx(0.0)
    assert t3.loc["NDCG@10", "improvement %"] == pytest.approx(((2 * a + b) / 3 - b) / b * 100)  # of the means
    assert t3.loc["NDCG@10", "coverage"] == 0.75 and t3.loc["NDCG@10", "coverage std"] == 0.0
    assert len(t.significance) == 3 * 2 * 3  # still per run: 3 runs x 2 scopes x 3 metrics

    texts = render(t)
    names = ", ".join(p.name for p in lrus)
    assert f"| LRURec | n=3: {names} | 4 | 0.2000 ± 0.1000 / – |" in texts["table1.md"]
    assert f"| LRURec | lrurec_h128 | 4 | 0.5000 / – |" in texts["table1.md"]
    assert "mean ± sample standard deviation over its n runs" in texts["table1.md"]
    assert f"| n=3: {', '.join(p.name for p in rrs)} | 3.0/4 (75.0% ± 0.0%) |" in texts["table3.md"]
    ndcg = f"{b:.4f} ± 0.0000 → {(2 * a + b) / 3:.4f} ± {abs(a - b) / math.sqrt(3):.4f} (+{((2 * a + b) / 3 - b) / b * 100:.1f}%)"
    assert ndcg in texts["table3.md"]
    csv = texts["table1.csv"].splitlines()
    assert "n" in csv[0].split(",") and "NDCG@10 std" in csv[0].split(",")


def test_two_runs_of_one_method_and_seed_are_refused(seed_runs, tmp_path):
    lrus, _, _ = seed_runs
    again = _set_config(write_run(tmp_path / "again"), seed=1, retriever={"model": "lrurec", "hidden": 64})
    with pytest.raises(PipelineError, match=r"are both LRURec with seed 1 and the same settings: pass one of them"):
        build_tables([*lrus, again], n_resamples=10)
    # another seed of the same method is welcome
    _set_config(again, seed=3)
    t1 = build_tables([*lrus, again], n_resamples=10).table1
    assert list(t1[t1["method"] == "LRURec"]["n"]) == [4]


def test_script_prints_seed_means(seed_runs, tmp_path):
    lrus, rrs, _ = seed_runs
    proc = run_script("scripts/reproduce_tables.py", "--runs", *map(str, [*lrus, *rrs]), "--out", str(tmp_path / "out"),
                      "--resamples", "100")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "0.2000 ± 0.1000 / 0.0705" in proc.stdout  # LRURec NDCG@10 over 3 seeds, beside the paper's
    assert "0.3500 ± 0.0500 / 0.0759" in proc.stdout  # the reranker's overall NDCG@10


def _summary(run: Path, epochs_run: int, best_epoch: int, train_seconds: float, start: str, end: str, best_val: float = 0.1) -> None:
    """retriever_summary.json and run.json as train_retriever.py writes them (validation every epoch)."""
    # a curve the stopping rule (window 1) produces: rising to best_val at best_epoch, then below it
    history = [{"epoch": e, "NDCG@10": best_val * e / best_epoch if e <= best_epoch else 0.05} for e in range(1, epochs_run + 1)]
    (run / "retriever_summary.json").write_text(json.dumps(
        {"epochs_run": epochs_run, "best_epoch": best_epoch, "best_val_NDCG@10": best_val, "train_seconds": train_seconds,
         "history": history}))
    (run / "run.json").write_text(json.dumps({"start": start, "end": end}))


def test_convergence_table_epochs_stops_and_times(seed_runs, tmp_path):
    """Seeds stopped by patience after 20 and 12 epochs, and one that ran into max_epochs (30) with
    its best at 29: the row says so, with means and sample stds computed by hand."""
    lrus, rrs, _ = seed_runs
    for lru in lrus:
        _set_config(lru, retriever={"model": "lrurec", "hidden": 64, "max_epochs": 30, "patience": 5})
    _summary(lrus[0], 20, 15, 100.0, "2026-01-01T00:00:00+00:00", "2026-01-01T00:02:00+00:00", 0.11)  # 5 after best: patience
    _summary(lrus[1], 12, 7, 60.0, "2026-01-01T00:00:00+00:00", "2026-01-01T00:01:30+00:00", 0.12)
    _summary(lrus[2], 30, 29, 200.0, "2026-01-01T00:00:00+00:00", "2026-01-01T00:04:00+00:00", 0.13)  # 1 after best: bound
    pop = _set_config(write_run(tmp_path / "pop", retriever="pop"), retriever={"model": "pop"})
    t = build_tables([*lrus, pop, *rrs], n_resamples=10)
    conv = t.convergence.set_index("method")
    lru = conv.loc["LRURec"]
    assert lru["n"] == 3 and lru["max_epochs"] == "30" and lru["patience"] == "5"
    assert lru["epochs_run"] == pytest.approx(62 / 3) and lru["epochs_run std"] == pytest.approx(math.sqrt(((20 - 62 / 3) ** 2 + (12 - 62 / 3) ** 2 + (30 - 62 / 3) ** 2) / 2))
    assert lru["best_epoch"] == pytest.approx(17.0) and lru["train_seconds"] == pytest.approx(120.0)
    assert lru["best_val_ndcg10"] == pytest.approx(0.12) and lru["best_val_ndcg10 std"] == pytest.approx(0.01)
    assert lru["wall_seconds"] == pytest.approx(150.0)  # 120, 90, 240
    assert (lru["stopped by patience"], lru["stopped by epoch bound"]) == (2, 1)
    assert lru["NDCG@10"] == pytest.approx(0.2) and lru["Recall@20 std"] == pytest.approx(0.1)
    popularity = conv.loc["Popularity"]
    assert math.isnan(popularity["epochs_run"]) and popularity["stopped by patience"] == 0
    texts = render(t)
    # kept - neighbours: seed 0: 0.11 - (0.11 * 14/15 + 0.05) / 2 = 0.0287; seed 2 (best at 29 of 30): 0.13 - (0.13 * 28/29 + 0.05) / 2
    margins = [0.11 - (0.11 * 14 / 15 + 0.05) / 2, 0.12 - (0.12 * 6 / 7 + 0.05) / 2, 0.13 - (0.13 * 28 / 29 + 0.05) / 2]
    assert lru["max_kept_margin"] == pytest.approx(max(margins))
    assert (f"| LRURec | 3 | 20.7 ± 9.0 | 17.0 ± 11.1 | 0.1200 ± 0.0100 | 30 | 5 | 1 | patience 2/3, BOUND 1/3 | {max(margins):+.4f} | 120 ± 72 | 150 ± 79 |"
            in texts["convergence.md"])
    assert "| Popularity | 1 | – | – | – | – | – | – | – | – |" in texts["convergence.md"]
    # each seed's curve around its kept epoch: seed 0 kept 15, two validations either side
    row = f"| LRURec | {lrus[0].name} | {0.11 * 13 / 15:.4f} @13 | {0.11 * 14 / 15:.4f} @14 | **0.1100** @15 | 0.0500 @16 | 0.0500 @17 |"
    assert f"{row} {margins[0]:+.4f} |" in texts["convergence.md"]
    assert f"| **0.1300** @29 | 0.0500 @30 | – |" in texts["convergence.md"]  # the bound: one validation after the kept one
    curves = t.kept_curves.set_index("run")
    assert curves.loc[str(lrus[1]), "kept_epoch"] == 7 and curves.loc[str(lrus[1]), "epoch -2"] == 5
    # the curves behind it, one column per method: 3 seed lines and 3 stars (the kept epochs) on validation
    fig = retriever_curves_figure(seed_summaries(t.groups[0]))
    val_ax = fig.get_axes()[0]
    assert len(fig.get_axes()) == 2 and val_ax.get_title() == "LRURec: validation NDCG@10"
    stars = [(list(line.get_xdata()), list(line.get_ydata())) for line in val_ax.get_lines() if line.get_marker() == "*"]
    assert stars == [([15], [0.11]), ([7], [0.12]), ([29], [0.13])]
    out = tmp_path / "tables_out"
    proc = run_script("scripts/reproduce_tables.py", "--runs", *map(str, [*lrus, pop]), "--out", str(out), "--resamples", "10")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert png_size(out / "retriever_curves.png")[0] > 600 and (out / "kept_curves.csv").is_file()
    assert "### Retriever training: how each run ended" in texts["tables.md"]
    assert texts["convergence.csv"].splitlines()[0].startswith("dataset,split,method,run,n,epochs_run")


def test_convergence_wall_time_only_for_retriever_only_runs(tmp_path):
    """A run that also trained a reranker (run_experiment.py) has no retriever wall time; nor has a
    resumed run (its span includes the pause)."""
    both = write_run(tmp_path / "both", reranker="tiny-qwen2")
    _summary(both, 10, 5, 50.0, "2026-01-01T00:00:00+00:00", "2026-01-01T00:30:00+00:00")
    resumed = _set_config(write_run(tmp_path / "resumed", retriever="sasrec"), seed=1)
    _summary(resumed, 10, 5, 50.0, "2026-01-01T00:00:00+00:00", "2026-01-01T00:30:00+00:00")
    (resumed / "run.json").write_text(json.dumps({"start": "2026-01-01T00:00:00+00:00", "end": "2026-01-01T00:30:00+00:00",
                                                  "resumes": [{"start": "2026-01-01T00:20:00+00:00"}]}))
    conv = build_tables([both, resumed], n_resamples=10).convergence.set_index("method")
    assert conv.loc["LRURec", "train_seconds"] == 50.0 and math.isnan(conv.loc["LRURec", "wall_seconds"])
    assert math.isnan(conv.loc["SASRec", "wall_seconds"])
