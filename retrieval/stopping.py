"""Early stopping on a moving average of the validation metric: the rule every neural retriever uses.

Best-of-epochs on 943 validation users selects noise: a one-epoch spike can both stop training and be
the weights kept (BERT4Rec seed 2 kept a 0.0868 amid 0.069-0.080 neighbours, its test NDCG@10 0.0474
against 0.0607-0.0723 for the other seeds). So patience counts validations without a better mean of
the last `window` ones, and the weights kept are the best single epoch inside the best window.
`window` 1 is the raw curve (the paper's rule).

`SmoothedStopping` is the rule the training loop steps once per validation (`retrieval.training`);
`replay` steps the same rule over a finished run's recorded curve, so the tables say what ended a run
(patience or the epoch bound) by the rule itself rather than by a look-alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

EARLY_STOP_METRIC = "NDCG@10"  # the validation metric the rule reads (paper), in the loop and in the tables


@dataclass
class SmoothedStopping:
    window: int
    patience: int
    best: float = -1.0  # the best mean of `window` validations so far (-1: none yet; metrics are >= 0)
    bad: int = 0  # validations since that mean last improved
    recent: list = field(default_factory=list)  # (epoch, value, payload) of the last `window` validations

    def observe(self, epoch: int, value: float, payload: Any = None) -> Optional[tuple[int, float, Any]]:
        """Step the rule with one validation; when the window's mean improved, the window's best
        single epoch (epoch, value, payload) to keep (ties: the earlier epoch), else None."""
        self.recent = [*self.recent, (epoch, value, payload)][-self.window:]
        smoothed = sum(v for _, v, _ in self.recent) / len(self.recent)
        if smoothed > self.best:
            self.best, self.bad = smoothed, 0
            return max(self.recent, key=lambda r: (r[1], -r[0]))
        self.bad += 1
        return None

    @property
    def stopped(self) -> bool:
        return self.bad >= self.patience


@dataclass(frozen=True)
class Replay:
    stopped_at: Optional[int]  # the epoch whose validation ended training; None: the curve ended first
    kept_epoch: Optional[int]  # the epoch whose weights the rule keeps (None: no validation)
    best_smoothed: float


def replay(curve: Sequence[tuple[int, float]], window: int, patience: int) -> Replay:
    """The rule stepped over (epoch, value) validations in order, as the training loop steps it."""
    rule, kept = SmoothedStopping(window, patience), None
    for epoch, value in curve:
        improved = rule.observe(epoch, value)
        if improved is not None:
            kept = improved[0]
        if rule.stopped:
            return Replay(epoch, kept, rule.best)
    return Replay(None, kept, rule.best)
