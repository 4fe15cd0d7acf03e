"""Plots (analysis/plots.py, scripts/plot_run.py): PNGs written, and the curves read from the smoke
run's TensorBoard event files agree with its JSON summaries."""
import json
import shutil

import pytest

from analysis.plots import (
    metrics_per_k_figure,
    plot_metrics_per_k,
    plot_position_bias,
    plot_run,
    plot_training_curves,
    read_scalars,
    training_curves,
)
from analysis.position_bias import position_bias
from pipeline.errors import PipelineError
from tests.helpers.png import png_size
from tests.helpers.scripts import run_script


def test_curves_from_the_smoke_runs_event_files(smoke_run):
    run_dir, _ = smoke_run
    curves = training_curves(run_dir)
    rr, rt = curves["reranker"], curves["retriever"]
    assert rr["source"] == rt["source"] == "tensorboard"
    # Reranker validations: the same steps and values as train_summary.json (events hold float32).
    summary = json.loads((run_dir / "train_summary.json").read_text())
    vals = summary["validations"]
    for metric in ("NDCG@10", "Recall@10", "MRR@10", "NDCG@1"):
        assert [s for s, _ in rr["eval"][metric]] == [v["step"] for v in vals]
        assert [x for _, x in rr["eval"][metric]] == pytest.approx([v[metric] for v in vals], rel=1e-6, abs=1e-7)
    # The Trainer logs the loss from the first step on, every logging_steps.
    assert rr["loss"] and rr["loss"][0][0] == 1 and all(x > 0 for _, x in rr["loss"])
    # Retriever: one loss and one validation per epoch, as retriever_summary.json.
    hist = json.loads((run_dir / "retriever_summary.json").read_text())["history"]
    assert [e for e, _ in rt["loss"]] == [h["epoch"] for h in hist]
    assert [x for _, x in rt["loss"]] == pytest.approx([h["loss"] for h in hist], rel=1e-6)
    assert [x for _, x in rt["eval"]["NDCG@10"]] == pytest.approx([h["NDCG@10"] for h in hist], rel=1e-6)


def test_curves_fall_back_to_the_json_summaries(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("train_summary.json", "retriever_summary.json"):
        shutil.copy(run_dir / name, bare / name)
    curves = training_curves(bare)
    assert curves["reranker"]["source"] == "train_summary.json" and curves["reranker"]["loss"] == []
    vals = json.loads((bare / "train_summary.json").read_text())["validations"]
    assert curves["reranker"]["eval"]["NDCG@10"] == [(v["step"], v["NDCG@10"]) for v in vals]
    assert curves["retriever"]["source"] == "retriever_summary.json"
    assert len(curves["retriever"]["loss"]) == len(json.loads((bare / "retriever_summary.json").read_text())["history"])
    assert png_size(plot_training_curves(bare, tmp_path / "curves.png"))[0] > 600
    with pytest.raises(PipelineError, match="no training logs"):
        training_curves(tmp_path / "nothing")


def test_a_resumed_runs_event_files_are_merged(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    for name, points in (("first", {1: 3.0, 2: 2.5}), ("second", {2: 2.0, 3: 1.5})):  # resumed from step 2
        writer = SummaryWriter(str(tmp_path / name))
        for step, value in points.items():
            writer.add_scalar("train/loss", value, step)
        writer.close()
    logs = tmp_path / "tensorboard"
    logs.mkdir()
    # Event file names start with their creation time: the resumed run's file is the later one.
    for name, stamp in (("first", 1000), ("second", 2000)):
        (src,) = (tmp_path / name).glob("events.out.tfevents.*")
        src.rename(logs / f"events.out.tfevents.{stamp}.host.{name}")
    assert read_scalars(logs) == {"train/loss": [(1, 3.0), (2, 2.0), (3, 1.5)]}


def test_metrics_per_k_and_position_bias_pngs(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    w, h = png_size(plot_metrics_per_k(run_dir, tmp_path / "m.png"))
    assert w > 600 and h > 400
    # One row per split, one column per metric; the reranker's lines stop at k = 20, the retriever's go to 50.
    fig = metrics_per_k_figure(json.loads((run_dir / "metrics.json").read_text()))
    axes = fig.get_axes()
    assert len(axes) == 2 * 3
    lines = {line.get_label(): list(line.get_xdata()) for line in axes[0].get_lines()}
    assert lines["retriever (all users)"] == [1, 5, 10, 20, 50] and lines["reranker (covered)"] == [1, 5, 10, 20]
    # A retriever-only run has its one line per panel.
    only = metrics_per_k_figure({"test": {"retriever": {"NDCG@10": 0.1, "Recall@10": 0.2, "MRR@10": 0.05}}})
    assert [len(ax.get_lines()) for ax in only.get_axes()] == [1, 1, 1]
    with pytest.raises(PipelineError, match="no split"):
        metrics_per_k_figure({"test": {"coverage": 0.5}})
    rows = [{"user": "u", "candidates": ["a", "b"], "target": "b"}]
    result = position_bias(rows, [[([0, 1], [0.0, 1.0]), ([1, 0], [0.0, 1.0])]])
    assert png_size(plot_position_bias(result, tmp_path / "pb.png"))[0] > 600


def test_plot_run_script(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    proc = run_script("scripts/plot_run.py", "--run", str(run_dir), "--out", str(tmp_path / "plots"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = sorted(p.name for p in (tmp_path / "plots" / run_dir.name).iterdir())
    assert written == ["metrics_per_k.png", "training_curves.png"]
    assert proc.stdout.split() == [str(tmp_path / "plots" / run_dir.name / n) for n in written]
    for name in written:
        assert min(png_size(tmp_path / "plots" / run_dir.name / name)) > 300
    proc = run_script("scripts/plot_run.py", "--run", str(run_dir), "--out", str(run_dir / "plots"))
    assert proc.returncode == 2 and "would write into run" in proc.stderr
    assert not (run_dir / "plots").exists()
    assert plot_run(run_dir, tmp_path / "api") == [tmp_path / "api" / "metrics_per_k.png", tmp_path / "api" / "training_curves.png"]


def test_a_reranker_runs_own_evidence_plots(tmp_path):
    """top1_slots_<split>.png (raw and calibrated bars, the targets' ticks) and train_curves.png from
    train_summary.json, with or without train_losses and the shuffled validation keys."""
    from rerank.evaluation.figures import plot_top1_slots, plot_train_summary, top1_slots_figure, train_summary_figure

    hist = {"n": 4, "counts": [3, 1, 0], "max_share": 0.75, "max_slot": 0, "target_counts": [1, 1, 2]}
    section = {"llm_top1_slots": hist, "llm_raw_top1_slots": {**hist, "counts": [0, 0, 4], "max_share": 1.0},
               "calibration": {"method": "permuted", "prior": {}}}
    ax = top1_slots_figure(section).get_axes()[0]
    assert [p.get_height() for p in ax.patches] == [0, 0, 4, 3, 1, 0]  # raw bars, then calibrated
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["targets in slot", "LLM raw top-1, max share 1.00", "LLM (permuted) top-1, max share 0.75"]
    assert len(top1_slots_figure({"llm_top1_slots": hist}).get_axes()[0].patches) == 3
    with pytest.raises(PipelineError, match="no llm_top1_slots"):
        top1_slots_figure({"subset": {}})
    assert min(png_size(plot_top1_slots(section, tmp_path / "top1.png"))) > 300

    vals = [{"step": 2, "NDCG@10": 0.1, "Recall@10": 0.3, "shuffled_NDCG@10": 0.05}, {"step": 4, "NDCG@10": 0.2, "Recall@10": 0.4, "shuffled_NDCG@10": 0.1}]
    summary = {"train_losses": [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}], "validations": vals, "best_step": 4}
    loss_ax, eval_ax = train_summary_figure(summary).get_axes()
    assert list(loss_ax.get_lines()[0].get_ydata()) == [3.0, 2.5]
    assert [line.get_label() for line in eval_ax.get_lines()] == ["NDCG@10", "shuffled_NDCG@10", "Recall@10", "best step 4"]
    old_loss_ax, old_eval_ax = train_summary_figure({"validations": [{"step": 2, "NDCG@10": 0.1}]}).get_axes()
    assert not old_loss_ax.get_lines() and "no train_losses" in old_loss_ax.texts[0].get_text()
    assert [line.get_label() for line in old_eval_ax.get_lines()] == ["NDCG@10"]
    (tmp_path / "train_summary.json").write_text(json.dumps(summary))
    assert min(png_size(plot_train_summary(tmp_path / "train_summary.json", tmp_path / "train_curves.png"))) > 300
    with pytest.raises(PipelineError, match="not valid JSON"):
        plot_train_summary(tmp_path / "missing.json", tmp_path / "x.png")
