"""Concurrent requests gathered into one forward pass: a bounded queue and one worker.

A request handler `submit`s its prepared item and awaits the result. The worker takes the first
waiting item, then keeps taking items until it holds `max_batch_size` of them or `max_wait_s` has
passed since the first one, and runs `fn` on the whole batch in a worker thread (so the event loop
keeps accepting and parsing requests while the model runs). With a full queue `submit` refuses at
once (`QueueFull`), so an overloaded server answers 503 instead of letting latency grow without
bound. One batch runs at a time: the model is the bottleneck, and one pass over B prompts is
cheaper than B passes.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence


class QueueFull(Exception):
    """The batcher's queue holds `max_queue` requests already."""


@dataclass
class BatchStats:
    """Counters shown by GET /info: how many requests each forward pass served."""

    requests: int = 0
    batches: int = 0
    largest_batch: int = 0
    failed_batches: int = 0
    sizes: dict[int, int] = field(default_factory=dict)  # batch size -> how many batches had it

    def record(self, n: int) -> None:
        self.requests += n
        self.batches += 1
        self.largest_batch = max(self.largest_batch, n)
        self.sizes[n] = self.sizes.get(n, 0) + 1


class MicroBatcher:
    def __init__(self, fn: Callable[[Sequence[Any]], Sequence[Any]], max_batch_size: int, max_wait_s: float, max_queue: int) -> None:
        self.fn, self.max_batch_size, self.max_wait_s = fn, max_batch_size, max_wait_s
        self.queue: asyncio.Queue = asyncio.Queue(maxsize=max_queue)
        self.stats = BatchStats()
        self._task: Optional[asyncio.Task] = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, item: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait((item, future))
        except asyncio.QueueFull:
            raise QueueFull from None
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait_s
            while len(batch) < self.max_batch_size:
                # Take whatever is already waiting without sleeping; wait only for the rest.
                if not self.queue.empty():
                    batch.append(self.queue.get_nowait())
                    continue
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
            live = [(item, fut) for item, fut in batch if not fut.done()]  # a client that left is not scored
            if not live:
                continue
            try:
                results = await asyncio.to_thread(self.fn, [item for item, _ in live])
            except Exception as e:  # the batch fails, the server goes on: each waiting request gets the error
                self.stats.failed_batches += 1
                for _, fut in live:
                    if not fut.done():
                        fut.set_exception(e)
                continue
            self.stats.record(len(live))
            for (_, fut), result in zip(live, results):
                if not fut.done():
                    fut.set_result(result)
