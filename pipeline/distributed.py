"""The processes of one run: those `accelerate launch` started (data parallel), or just this one.

    accelerate launch --multi_gpu --num_processes 4 scripts/train_reranker.py ...   # 4 GPUs, NCCL
    accelerate launch --multi_gpu --num_processes 2 scripts/... --set reranker.device=cpu   # 2 CPU processes, gloo

Training is data parallel through the transformers Trainer (it reads the same accelerate state).
Ranking splits its batches across the processes (`rerank.inference.rank_split.rank_split`). Files of the
run directory are written by the main process only; the others wait at a barrier where a later
step reads what the main process wrote. Run directories must be on a filesystem every process sees
(as the Trainer's checkpoints must).
"""
from __future__ import annotations

from contextlib import contextmanager
from datetime import timedelta
from typing import Any, Callable, Iterator, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object

from pipeline.device import resolve_device

T = TypeVar("T")

# How long a process waits at a barrier or collective before the run fails. The others wait while
# the main process trains the retriever (run_experiment.py) or writes files; torch's default (10
# min for NCCL) is shorter than a retriever's training. A hung run still ends after this.
TIMEOUT = timedelta(hours=2)


def processes(device: str) -> PartialState:
    """Join the launcher's processes (a no-op without `accelerate launch`). Call it before loading
    the model: on GPUs it makes each process's "cuda" its own GPU. `device`: reranker.device; on a
    CPU the processes talk over gloo."""
    return PartialState(cpu=resolve_device(device) == "cpu", timeout=TIMEOUT)


def rank_and_world() -> tuple[int, int]:
    """(this process's index, number of processes); (0, 1) when not launched distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for in a single process)."""
    if rank_and_world()[1] > 1:
        PartialState().wait_for_everyone()


def from_main(fn: Callable[[], T]) -> T:
    """`fn()` computed on the main process and sent to every process (one answer for all, e.g.
    which stages of a run are finished, read once from disk)."""
    if rank_and_world()[1] == 1:
        return fn()
    box: list[Any] = [fn() if is_main() else None]
    broadcast_object_list(box, from_process=0)
    return box[0]


def on_main(fn: Callable[[], T]) -> T | None:
    """Run `fn` on the main process only (it writes files); the others wait for it to finish."""
    out = fn() if is_main() else None
    barrier()
    return out


def gather(item: T) -> list[T]:
    """Every process's `item`, in process order, on every process."""
    if rank_and_world()[1] == 1:
        return [item]
    return gather_object([item])


@contextmanager
def main_first() -> Iterator[None]:
    """The main process runs the block first (it may build a cache: preprocessed data, a converted
    model), the others after it (they then read that cache)."""
    if rank_and_world()[1] == 1:
        yield
        return
    with PartialState().main_process_first():
        yield
