"""Timing: variants run interleaved (a slow spell hits them alike), and one figure's record
(ratio of the medians, ratio of the fastest runs, target, pass)."""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import torch


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def time_interleaved(fns: Mapping[str, Callable[[], Any]], warmup: int, repeats: int, device: str) -> dict[str, list[float]]:
    """Seconds of each timed run of each function, run in turn (a, b, a, b, ...) so that a slow
    spell of a shared machine hits every variant alike; the first `warmup` rounds are not kept."""
    runs: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                runs[name].append(time.perf_counter() - t0)
    return runs


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def make_figure(
    what: str, ratio_is: str, raw: dict[str, Any], ratio: Optional[float], target: Optional[str], passed: Optional[bool]
) -> dict[str, Any]:
    """One figure. Timed figures (ratio "x_s / y_s" with x_runs_s, y_runs_s in `raw`) also get
    `ratio_of_fastest`, min(x runs) / min(y runs): a second view for a loaded machine, where other
    work only ever adds time; pass/fail is judged on the medians' ratio."""
    num, den = ratio_is.split(" / ")
    runs = [raw.get(key[: -len("_s")] + "_runs_s") for key in (num, den)]
    fastest = safe_ratio(min(runs[0]), min(runs[1])) if all(runs) and num.endswith("_s") else None
    return {
        "what": what, "ratio_is": ratio_is, "ratio": ratio, "ratio_of_fastest": fastest, "target": target, "pass": passed, "raw": raw,
    }


def reported_timing(what: str, runs: Mapping[str, list[float]], num: str, den: str) -> dict[str, Any]:
    """A timed figure without a target: median seconds of `runs[num]` over those of `runs[den]`."""
    num_s, den_s = median(runs[num]), median(runs[den])
    raw = {f"{num}_s": num_s, f"{den}_s": den_s, f"{num}_runs_s": runs[num], f"{den}_runs_s": runs[den]}
    return make_figure(what, f"{num}_s / {den}_s", raw, safe_ratio(num_s, den_s), None, None)


def safe_ratio(a: float, b: float) -> Optional[float]:
    return a / b if b else None
