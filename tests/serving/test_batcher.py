"""`serving.batcher` in-process (no model): concurrent submissions share one call of the batch
function, each caller gets its own result, a full queue refuses at once, a failing batch fails only
its own callers."""
import asyncio
import threading

import pytest

from serving.batcher import MicroBatcher, QueueFull


def run(coro):
    return asyncio.run(coro)


def test_concurrent_items_share_a_call_and_get_their_own_results():
    calls = []

    def fn(items):
        calls.append(list(items))
        return [x * 10 for x in items]

    async def main():
        b = MicroBatcher(fn, max_batch_size=4, max_wait_s=0.5, max_queue=16)
        b.start()
        try:
            results = await asyncio.gather(*(b.submit(i) for i in range(10)))
        finally:
            await b.stop()
        return results, b.stats

    results, stats = run(main())
    assert results == [i * 10 for i in range(10)]
    assert [len(c) for c in calls] == [4, 4, 2]  # at most max_batch_size per call, in arrival order
    assert sorted(x for c in calls for x in c) == list(range(10))
    assert stats.requests == 10 and stats.batches == 3 and stats.largest_batch == 4 and stats.sizes == {4: 2, 2: 1}


def test_full_queue_refuses_at_once():
    release = threading.Event()

    def fn(items):
        release.wait(10)  # hold the worker, so the queue fills
        return items

    async def main():
        b = MicroBatcher(fn, max_batch_size=1, max_wait_s=0.0, max_queue=2)
        b.start()
        try:
            first = asyncio.ensure_future(b.submit("running"))
            await asyncio.sleep(0.2)  # the worker took it and is blocked in fn
            queued = [asyncio.ensure_future(b.submit(f"q{i}")) for i in range(2)]
            await asyncio.sleep(0.05)
            with pytest.raises(QueueFull):
                await b.submit("one too many")
            release.set()
            return await first, [await q for q in queued]
        finally:
            release.set()
            await b.stop()

    assert run(main()) == ("running", ["q0", "q1"])


def test_a_failing_batch_fails_its_callers_and_the_next_batch_runs():
    def fn(items):
        if "bad" in items:
            raise RuntimeError("forward pass failed")
        return [x.upper() for x in items]

    async def main():
        b = MicroBatcher(fn, max_batch_size=8, max_wait_s=0.2, max_queue=16)
        b.start()
        try:
            failed = await asyncio.gather(b.submit("bad"), b.submit("ok"), return_exceptions=True)
            later = await b.submit("fine")
        finally:
            await b.stop()
        return failed, later, b.stats

    failed, later, stats = run(main())
    assert all(isinstance(e, RuntimeError) and "forward pass failed" in str(e) for e in failed)
    assert later == "FINE"
    assert stats.failed_batches == 1 and stats.batches == 1
