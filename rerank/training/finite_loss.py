"""Stop training the moment its loss is not finite.

A NaN or infinite loss (too high a learning rate, an overflow) turns every weight it touches into
NaN; the Trainer would go on for the remaining steps and the ranking would then meet NaN scores.
Checked at every logged loss and gradient norm (`logging_steps`), so little compute is spent on a
diverged run. The Trainer's default `logging_nan_inf_filter=True` logs a NaN step's loss as the
window's mean of the finite ones (0.0 when none is), which hid exactly this: the Trainers here set it
to False (`TRAINING_LOG_ARGS`).
"""
from __future__ import annotations

import math
from typing import Any

from transformers import TrainerCallback

from pipeline.errors import PipelineError

# TrainingArguments every Trainer of ours passes, so that a NaN loss reaches the logs.
TRAINING_LOG_ARGS = {"logging_nan_inf_filter": False}


class FiniteLossCallback(TrainerCallback):
    """Raise a one-line PipelineError when a logged training loss or gradient norm is NaN or
    infinite. `stage` names the training stage in the message; `fix` is the advice it gives (e.g.
    the learning rate key)."""

    def __init__(self, stage: str, fix: str) -> None:
        self.stage, self.fix = stage, fix

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kwargs: Any) -> None:
        for key in ("loss", "grad_norm"):
            value = (logs or {}).get(key)
            if isinstance(value, (int, float)) and not math.isfinite(value):
                what = "training loss" if key == "loss" else "gradient norm"
                raise PipelineError(
                    f"{self.stage}: the {what} is {value} at step {state.global_step} (the model diverged): {self.fix}"
                )
