"""The smoothed early-stopping rule (`retrieval.stopping`) on hand-computed curves, and the tables'
reading of what ended a run (`analysis.tables.convergence.stopped_by`), which replays it."""
import pytest

from analysis.tables.convergence import BOUND, PATIENCE, kept_margin, stopped_by
from retrieval.stopping import SmoothedStopping, replay


def test_window_one_is_best_of_epochs_with_patience():
    curve = list(enumerate([0.10, 0.20, 0.15, 0.18, 0.19], start=1))
    r = replay(curve, window=1, patience=3)
    assert (r.stopped_at, r.kept_epoch, r.best_smoothed) == (5, 2, 0.20)


def test_window_three_keeps_the_best_epoch_of_the_best_window():
    # means of 3: 0.1, 0.15, 0.2 (epochs 1-3), 0.2333 (2-4: best), then 0.2167, 0.1667, 0.1333 -> 3 without gain stops at 7
    curve = list(enumerate([0.10, 0.20, 0.30, 0.20, 0.15, 0.15, 0.10], start=1))
    r = replay(curve, window=3, patience=3)
    assert r.stopped_at == 7 and r.kept_epoch == 3 and r.best_smoothed == pytest.approx(0.7 / 3)


def test_curve_ending_before_patience_is_not_a_stop():
    r = replay([(1, 0.1), (2, 0.2), (3, 0.19)], window=1, patience=2)
    assert r.stopped_at is None and r.kept_epoch == 2


def test_ties_keep_the_earlier_epoch_and_an_equal_mean_is_no_gain():
    rule = SmoothedStopping(window=2, patience=5)
    assert rule.observe(1, 0.1, "a") == (1, 0.1, "a")
    assert rule.observe(2, 0.3, "b") == (2, 0.3, "b")  # mean 0.2: improved
    assert rule.observe(3, 0.3, "c") == (2, 0.3, "b")  # mean 0.3: improved; epochs 2 and 3 tie, the earlier kept
    assert rule.observe(4, 0.3, "d") is None and rule.bad == 1  # mean 0.3 again: no gain


def test_stopped_by_replays_the_smoothed_rule():
    """The smoothed-best window is epochs 8-10 (mean 0.2333), its best single epoch 8 is kept, and
    patience 4 counts from epoch 10, so the rule stops at 14. A run whose curve ends at 13 hit its
    bound, although 5 validations follow the kept epoch (counting after the kept epoch, as the tables
    did before the rule was replayed, called it a patience stop)."""
    values = [0.05, 0.06, 0.07, 0.08, 0.09, 0.10, 0.11, 0.30, 0.20, 0.20, 0.10, 0.10, 0.10, 0.10]
    history = [{"epoch": e, "NDCG@10": v} for e, v in enumerate(values, start=1)]
    r = replay([(h["epoch"], h["NDCG@10"]) for h in history], window=3, patience=4)
    assert (r.stopped_at, r.kept_epoch) == (14, 8)
    assert stopped_by({"epochs_run": 14, "best_epoch": 8, "history": history}, patience=4, smooth_window=3) == PATIENCE
    assert stopped_by({"epochs_run": 13, "best_epoch": 8, "history": history[:13]}, patience=4, smooth_window=3) == BOUND
    # kept epoch 8 stands 0.30 - (0.11 + 0.20) / 2 = 0.145 above its neighbours: a spike
    assert kept_margin({"best_epoch": 8, "history": history}) == pytest.approx(0.145)
    assert stopped_by({"history": history}, patience=4) is None
