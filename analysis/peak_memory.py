"""Peak memory of one call, measured two ways (the benchmark's training-step figure).

- `tensor_peak_bytes(fn, device)`: the most bytes of tensor memory live at once during `fn()`,
  above what was live when it started. CUDA: `torch.cuda.max_memory_allocated` after
  `reset_peak_memory_stats`, minus the bytes allocated before. CPU: torch's profiler with
  `profile_memory=True` reports every CPU-allocator allocation (+bytes) and free (-bytes) with its
  time stamp; the running sum in time order, from the start of the call, peaks at the answer.
  Exact and deterministic (no malloc caching, no other process), but it sees torch tensors only.
- `rss_peak_delta_bytes(fn)`: the operating system's view (Linux): the process's resident-set
  high-water mark (VmHWM) is reset to the current RSS (`/proc/self/clear_refs` <- "5"), `fn()` runs,
  and the answer is VmHWM minus the RSS before. Counts everything (allocator slack, library
  buffers), but freed memory kept by malloc hides later peaks, so it is only meaningful for the
  first large call in a fresh process: the benchmark runs it in a spawned subprocess per variant.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import torch

from pipeline.errors import PipelineError

CPU_METHOD = (
    "tensor bytes: torch.profiler(profile_memory=True) CPU-allocator events, running sum of allocations "
    "minus frees in time order from the start of the step, maximum"
)
CUDA_METHOD = "tensor bytes: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus the bytes allocated before the step"
RSS_METHOD = (
    "process RSS: fresh spawned process per variant, VmHWM reset via /proc/self/clear_refs, first step, "
    "VmHWM minus VmRSS before the step"
)


def tensor_peak_bytes(fn: Callable[[], Any], device: str) -> int:
    """Peak tensor bytes allocated by `fn()` above those live when it starts (see module doc)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and "CPU" in str(e.device_type())]
    if not events:
        raise PipelineError("torch's profiler recorded no CPU memory events: this torch build cannot measure CPU memory")
    return _peak_of_running_sum((e.start_ns(), e.nbytes()) for e in events)


def _peak_of_running_sum(events) -> int:
    """max over time of the running sum of (time, +/-bytes) events, 0 at the start."""
    current = peak = 0
    for _, nbytes in sorted(events, key=lambda e: e[0]):
        current += nbytes
        peak = max(peak, current)
    return int(peak)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise PipelineError(f"/proc/self/status has no {field}: the RSS measurement needs Linux")


def rss_available() -> bool:
    """True where the RSS high-water mark can be reset (Linux >= 4.0 with a writable clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_kib("VmHWM")
        return True
    except (OSError, PipelineError):
        return False


def rss_peak_delta_bytes(fn: Callable[[], Any]) -> Optional[int]:
    """Resident-set high-water mark of `fn()` above the RSS before it; None where unsupported."""
    if not rss_available():  # also resets the high-water mark to the current RSS
        return None
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) * 1024
