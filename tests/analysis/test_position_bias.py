"""Position bias (analysis/position_bias.py, scripts/position_bias.py): per-slot top-1 accuracy and
slot preference from hand-built per-order scores, and the script on the smoke run."""
import importlib.util
import json
import math
import struct

import pytest

from analysis.position_bias import averaged_scores, candidate_scores, position_bias, to_csv, to_markdown, write_outputs
from pipeline.candidates import rankings_path, raw_scores, read_rows
from pipeline.errors import PipelineError
from pipeline.metrics import candidate_rank, metrics_from_ranks
from rerank.evaluation.metrics import RERANK_KS
from tests.helpers.scripts import REPO, run_script

# Three users, three candidates, two orders each (identity, then a shuffle). Worked by hand:
#   u1 target a (idx 0). identity [3,1,2]: a first (hit, pick slot A).
#      shuffle [2,0,1] scores [5,1,0]: c=5 a=1 b=0 -> c first (pick slot A), a is in slot B (miss, rank 2).
#      averaged: a=(3+1)/2=2, b=0.5, c=3.5 -> c first (retriever slot C), a rank 2 (slot A).
#   u2 target f (idx 2). identity [0,0,1]: f first (hit, slot C, pick C).
#      shuffle [1,2,0] scores [0,4,4]: e=0 f=4 d=4; tie f/d goes to the earlier candidate d -> f rank 2,
#      pick d, which is in slot C; f is in slot B (miss).
#      averaged: d=2, e=0, f=2.5 -> f first (hit, slot C, pick C).
#   u3 target h (idx 1). identity [2,2,0]: tie g/h goes to g -> h rank 2 (slot B, miss), pick slot A.
#      shuffle [1,0,2] scores [7,0,0]: h=7 first (hit, slot A, pick A).
#      averaged: g=1, h=4.5, i=0 -> h first (hit, slot B, pick B).
ROWS = [
    {"user": "u1", "candidates": ["a", "b", "c"], "target": "a"},
    {"user": "u2", "candidates": ["d", "e", "f"], "target": "f"},
    {"user": "u3", "candidates": ["g", "h", "i"], "target": "h"},
]
PER_ORDER = [
    [([0, 1, 2], [3.0, 1.0, 2.0]), ([2, 0, 1], [5.0, 1.0, 0.0])],
    [([0, 1, 2], [0.0, 0.0, 1.0]), ([1, 2, 0], [0.0, 4.0, 4.0])],
    [([0, 1, 2], [2.0, 2.0, 0.0]), ([1, 0, 2], [7.0, 0.0, 0.0])],
]


def _column(result, condition, field):
    return [s[field] for s in result["conditions"][condition]["slots"]]


def test_per_slot_accuracy_and_picks_by_hand():
    r = position_bias(ROWS, PER_ORDER)
    assert r["n_users"] == 3 and r["n_slots"] == 3 and r["permutations"] == 2 and r["labels"] == ["A", "B", "C"]
    # retriever order: targets in A (u1), C (u2), B (u3); u1 and u2 hit; picks A, C, A.
    assert _column(r, "retriever_order", "n") == [1, 1, 1]
    assert _column(r, "retriever_order", "hits") == [1, 0, 1]
    assert _column(r, "retriever_order", "accuracy") == [1.0, 0.0, 1.0]
    assert _column(r, "retriever_order", "picks") == [2, 0, 1]
    assert _column(r, "retriever_order", "pick_share") == pytest.approx([2 / 3, 0.0, 1 / 3])
    # shuffled: targets in B (u1), B (u2), A (u3); only u3 hits; no target in slot C.
    assert _column(r, "shuffled", "n") == [1, 2, 0]
    assert _column(r, "shuffled", "accuracy") == [1.0, 0.0, None]
    assert _column(r, "shuffled", "picks") == [2, 0, 1]
    # averaged: slots in retriever order (A, C, B); u2 and u3 hit; picks C, C, B.
    assert _column(r, "averaged", "n") == [1, 1, 1]
    assert _column(r, "averaged", "accuracy") == [0.0, 1.0, 1.0]
    assert _column(r, "averaged", "picks") == [0, 1, 2]
    # Overall metrics from the target ranks: retriever order [1, 1, 2], shuffled [2, 2, 1], averaged [2, 1, 1].
    ro = r["conditions"]["retriever_order"]["overall"]
    assert ro["Recall@1"] == pytest.approx(2 / 3)
    assert ro["MRR@5"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert ro["NDCG@5"] == pytest.approx((1 + 1 + 1 / math.log2(3)) / 3)
    assert r["conditions"]["shuffled"]["overall"]["Recall@1"] == pytest.approx(1 / 3)
    assert r["conditions"]["averaged"]["overall"]["MRR@20"] == pytest.approx((0.5 + 1 + 1) / 3)


def test_scores_move_from_slots_to_candidates_and_average_like_rank_rows():
    assert candidate_scores([2, 0, 1], [5.0, 1.0, 0.0]) == [1.0, 0.0, 5.0]
    assert averaged_scores(PER_ORDER[0]) == [2.0, 0.5, 3.5]
    with pytest.raises(PipelineError, match="permutation"):
        candidate_scores([0, 0, 1], [1.0, 2.0, 3.0])


def _slot_a_model(content, orders, bias=10.0):
    """A model that adds `bias` to whatever is shown in slot A, on top of each candidate's content score."""
    return [(order, [content[j] + (bias if slot == 0 else 0.0) for slot, j in enumerate(order)]) for order in orders]


def test_a_model_that_always_picks_slot_a_and_permutation_averaging_removes_it():
    k = 4
    # The 4 cyclic shifts: every candidate sits in slot A exactly once, so averaging adds bias/4 to each.
    orders = [[(s + i) % k for s in range(k)] for i in range(k)]
    rows, per_order = [], []
    for u, t in enumerate([0, 1, 2, 3, 1, 2]):  # targets in every slot of the retriever order
        rows.append({"user": f"u{u}", "candidates": list("wxyz"), "target": "wxyz"[t]})
        per_order.append(_slot_a_model([1.0 if j == t else 0.0 for j in range(k)], orders))
    r = position_bias(rows, per_order, labels=["A", "B", "C", "D"])
    assert _column(r, "retriever_order", "n") == [1, 2, 2, 1]
    assert _column(r, "retriever_order", "accuracy") == [1.0, 0.0, 0.0, 0.0]
    assert _column(r, "retriever_order", "pick_share") == [1.0, 0.0, 0.0, 0.0]
    assert _column(r, "shuffled", "picks") == [6, 0, 0, 0]  # the shuffle moves targets, slot A still wins
    assert _column(r, "averaged", "accuracy") == [1.0, 1.0, 1.0, 1.0]
    assert _column(r, "averaged", "picks") == [1, 2, 2, 1]  # picks now follow the targets
    assert r["conditions"]["averaged"]["overall"]["Recall@1"] == 1.0
    assert r["conditions"]["retriever_order"]["overall"]["Recall@1"] == pytest.approx(1 / 6)


def test_bad_input_is_one_line_error():
    with pytest.raises(PipelineError, match="at least two candidate orders"):
        position_bias(ROWS[:1], [PER_ORDER[0][:1]])
    with pytest.raises(PipelineError, match="3 rows but 2"):
        position_bias(ROWS, PER_ORDER[:2])
    with pytest.raises(PipelineError, match="covered rows only"):
        position_bias([{**ROWS[0], "target": "zz"}], PER_ORDER[:1])
    with pytest.raises(PipelineError, match="no covered users"):
        position_bias([], [])


def test_reports(tmp_path):
    r = position_bias(ROWS, PER_ORDER)
    lines = to_csv(r).splitlines()
    assert lines[0] == "condition,slot,label,n,hits,accuracy,picks,pick_share"
    assert lines[1] == "retriever_order,0,A,1,1,1.000000,2,0.666667"
    assert "shuffled,2,C,0,0,,1,0.333333" in lines and len(lines) == 1 + 3 * 3
    md = to_markdown(r)
    assert "| retriever order | 0.6667 |" in md
    assert "| C | 1 | 1.000 | 1.000 | 0 | - | 0.333 | 0.333 | 0.667 |" in md
    paths = write_outputs(r, tmp_path / "pb")
    assert [p.name for p in paths] == ["position_bias.json", "position_bias.csv", "position_bias.md", "position_bias.png"]
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(r))
    assert paths[3].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_script_on_the_smoke_run(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    out = tmp_path / "pb"
    proc = run_script(
        "scripts/position_bias.py", "--run", str(run_dir), "--out", str(out),
        "--set", "analysis.max_users=6", "--set", "analysis.split=val",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads((out / "position_bias.json").read_text())
    assert (r["split"], r["n_users"], r["n_slots"], r["permutations"], r["label_scheme"]) == ("val", 6, 20, 4, "letters")
    assert r["labels"] == [chr(ord("A") + i) for i in range(20)]
    for sec in r["conditions"].values():
        assert sum(s["n"] for s in sec["slots"]) == 6 and sum(s["picks"] for s in sec["slots"]) == 6
    # The retriever-order condition is the run's own raw LLM ranking (rank_permutations = 1, before
    # calibration and fusion) of the same users.
    users = set(r["users"])
    ranked = [row for row in read_rows(rankings_path(run_dir, "val")) if row["user"] in users]
    assert len(ranked) == 6
    own = metrics_from_ranks([candidate_rank(raw_scores(row), row["candidates"], row["target"]) for row in ranked], RERANK_KS)
    assert r["conditions"]["retriever_order"]["overall"] == pytest.approx(own)
    csv_lines = (out / "position_bias.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 3 * 20
    md = (out / "position_bias.md").read_text()
    assert md.startswith("# Position bias: run (val, letters)") and "| T |" in md and md in proc.stdout
    png = (out / "position_bias.png").read_bytes()
    width, height = struct.unpack(">II", png[16:24])
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and width > 600 and height > 400
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["source_run"] == str(run_dir) and run_json["end"]
    assert not (run_dir / "position_bias.json").exists()  # nothing written into the run read


def _script_main(name):
    """main() of scripts/<name>.py, imported in this process (no interpreter start-up)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def test_script_refuses_bad_arguments(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    main = _script_main("position_bias")
    with pytest.raises(PipelineError, match="is the run directory itself"):
        main(["--run", str(run_dir), "--out", str(run_dir)])
    # The default experiment's analysis config describes another run (all users, SmolLM2), not the smoke run.
    with pytest.raises(PipelineError, match="sets data.max_users = None but run .* was made with 60"):
        main(["--config", str(REPO / "configs/experiments/position_bias.yaml"), "--run", str(run_dir), "--out", str(tmp_path / "x")])
    with pytest.raises(PipelineError, match="position_permutations must be >= 2"):
        main(["--run", str(run_dir), "--out", str(tmp_path / "x"), "--set", "analysis.position_permutations=1"])
    assert not (tmp_path / "x").exists()


def test_chance_metrics_and_the_interval_against_chance():
    from analysis.position_bias import chance_metrics, vs_chance

    c = chance_metrics(4)
    assert c["Recall@1"] == pytest.approx(0.25)
    assert c["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 0.5 + 1 / math.log2(5)) / 4)
    always_first = vs_chance([1] * 30, [4] * 30)
    assert always_first["Recall@1"]["mean"] == 1.0 and always_first["Recall@1"]["excludes_zero"]
    assert always_first["Recall@1"]["ci_low"] == pytest.approx(0.75)  # no spread: 1 - 0.25 in every resample
    uniform = vs_chance([1, 2, 3, 4] * 10, [4] * 40)  # exactly chance on average
    assert uniform["NDCG@10"]["mean"] == pytest.approx(uniform["NDCG@10"]["chance"])
    assert not uniform["NDCG@10"]["excludes_zero"]
