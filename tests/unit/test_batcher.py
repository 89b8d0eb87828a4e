"""The batcher on its own, with a fake batch function: triggers, exactly-once resolution, limits, stop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from app.config.settings import BatchingConfig
from app.engine.batcher import Batcher, Completed
from app.engine.descriptions import BatchRecord
from app.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull
from tests.support.waiting import wait_until

FAR = 3600.0  # a deadline nobody reaches


class Recorder:
    """run_batch double: answers x -> 10x, records every batch, and can be held or made to fail."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.poison: int | None = None
        self.short = False

    def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.entered.set()
        assert self.gate.wait(timeout=30)
        if self.poison in items:
            raise ValueError("poisoned batch")
        outputs = [x * 10 for x in items]
        return outputs[:-1] if self.short else outputs


def make(recorder: Recorder, **config: float) -> Batcher[int, int]:
    values = {"max_batch_size": 4, "max_queue_delay_ms": 0, "max_queue_size": 64, **config}
    return Batcher(recorder, BatchingConfig.model_validate(values), name="test")


def submit(batcher: Batcher[int, int], items: list[int], deadline: float = FAR) -> list[asyncio.Future[Completed[int]]]:
    loop_deadline = asyncio.get_running_loop().time() + deadline
    with batcher.admit(len(items)) as admission:
        return admission.submit(items, loop_deadline)


async def values(*futures: asyncio.Future[Completed[int]]) -> list[int]:
    return [completed.value for completed in await asyncio.gather(*futures)]


async def hold_first_batch(batcher: Batcher[int, int], recorder: Recorder) -> asyncio.Future[Completed[int]]:
    """Occupy the inference thread with a batch of one, so that later items wait in the queue."""
    recorder.gate.clear()
    recorder.entered.clear()
    (first,) = submit(batcher, [0])
    assert await asyncio.to_thread(recorder.entered.wait, 10)
    return first


async def test_size_trigger_sends_a_full_batch_without_waiting_for_the_window() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=4, max_queue_delay_ms=60_000)
    await batcher.start()
    futures = submit(batcher, [1, 2, 3, 4])
    async with asyncio.timeout(10):  # the 60 s window must not be waited out
        assert await values(*futures) == [10, 20, 30, 40]
    assert recorder.batches == [[1, 2, 3, 4]]
    await batcher.stop(1)


async def test_time_trigger_sends_a_partial_batch_when_the_window_closes() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=100, max_queue_delay_ms=1)
    await batcher.start()
    futures = submit(batcher, [1, 2]) + submit(batcher, [3])
    async with asyncio.timeout(10):
        assert await values(*futures) == [10, 20, 30]
    assert recorder.batches == [[1, 2, 3]]
    assert batcher.stats.batch_sizes == [3]
    await batcher.stop(1)


async def test_a_lone_item_at_an_idle_model_goes_at_once_whatever_the_window() -> None:
    """Nothing else admitted, so nothing to wait for: the window would only add latency."""
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=8, max_queue_delay_ms=3_600_000)
    await batcher.start()
    async with asyncio.timeout(10):
        assert await values(*submit(batcher, [1])) == [10]
    assert recorder.batches == [[1]]
    await batcher.stop(1)


async def test_the_window_waits_for_images_admitted_and_still_being_prepared() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=2, max_queue_delay_ms=3_600_000)
    await batcher.start()
    loop = asyncio.get_running_loop()
    with batcher.admit(2) as admission:  # a request of two images; the second is still being decoded
        first = admission.submit([1], loop.time() + FAR)
        await wait_until(lambda: batcher.queued == 0)  # the consumer took the first and waits for the second
        await asyncio.sleep(0.05)
        assert recorder.batches == []
        second = admission.submit([2], loop.time() + FAR)
    async with asyncio.timeout(10):
        assert await values(*first, *second) == [10, 20]
    assert recorder.batches == [[1, 2]]
    await batcher.stop(1)


async def test_the_window_bounds_the_wait_for_an_admitted_image_that_never_comes() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=4, max_queue_delay_ms=20)
    await batcher.start()
    loop = asyncio.get_running_loop()
    with batcher.admit(2) as admission:  # the second image fails to decode and is never submitted
        first = admission.submit([1], loop.time() + FAR)
        async with asyncio.timeout(10):
            assert await values(*first) == [10]
    assert recorder.batches == [[1]]
    assert batcher.depth == 0
    await batcher.stop(1)


async def test_items_queued_during_a_forward_form_the_next_batches() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=3, max_queue_delay_ms=0)
    await batcher.start()
    first = await hold_first_batch(batcher, recorder)
    later = [submit(batcher, [i])[0] for i in (1, 2, 3, 4, 5)]
    recorder.gate.set()
    async with asyncio.timeout(10):
        assert (await first).value == 0
        assert await values(*later) == [10, 20, 30, 40, 50]
    # Even with no wait window, what queued up behind a forward goes in as full batches as possible.
    assert recorder.batches == [[0], [1, 2, 3], [4, 5]]
    await batcher.stop(1)


async def test_warmup_runs_once_before_serving() -> None:
    recorder = Recorder()
    batcher = make(recorder)
    await batcher.start(warmup=[7, 7])
    assert recorder.batches == [[7, 7]]
    assert batcher.alive
    await batcher.stop(1)


async def test_cancelled_item_is_skipped_and_the_rest_of_its_batch_runs() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=3)
    await batcher.start()
    await hold_first_batch(batcher, recorder)
    a, b, c, d = (submit(batcher, [i])[0] for i in (1, 2, 3, 4))
    b.cancel()
    recorder.gate.set()
    async with asyncio.timeout(10):
        assert await values(a, c, d) == [10, 30, 40]
    assert [2 in batch for batch in recorder.batches] == [False, False]
    assert recorder.batches[1] == [1, 3, 4]
    assert batcher.stats.skipped_cancelled == 1
    await batcher.stop(1)


async def test_an_exception_fails_every_request_of_its_batch_and_the_loop_goes_on() -> None:
    recorder = Recorder()
    recorder.poison = 2
    batcher = make(recorder, max_batch_size=3)
    await batcher.start()
    futures = submit(batcher, [1, 2, 3])
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert all(isinstance(r, InferenceFailed) for r in results)
    first = results[0]
    assert isinstance(first, InferenceFailed) and isinstance(first.__cause__, ValueError)
    (after,) = submit(batcher, [5])
    async with asyncio.timeout(10):
        assert (await after).value == 50
    assert batcher.alive
    assert batcher.stats.failed_batches == 1
    await batcher.stop(1)


async def test_a_batch_function_that_returns_too_few_results_fails_the_batch() -> None:
    recorder = Recorder()
    recorder.short = True
    batcher = make(recorder, max_batch_size=2)
    await batcher.start()
    results = await asyncio.gather(*submit(batcher, [1, 2]), return_exceptions=True)
    assert all(isinstance(r, InferenceFailed) for r in results)
    await batcher.stop(1)


async def test_queue_full_refuses_at_once_and_frees_room_as_items_are_taken() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=1, max_queue_size=3)
    await batcher.start()
    first = await hold_first_batch(batcher, recorder)  # taken off the queue: no longer counts
    queued = submit(batcher, [1, 2, 3])
    assert batcher.depth == 3
    with pytest.raises(QueueFull):
        batcher.admit(1)
    recorder.gate.set()
    async with asyncio.timeout(10):
        await asyncio.gather(first, *queued)
    assert batcher.depth == 0
    (again,) = submit(batcher, [4])
    assert (await again).value == 40
    await batcher.stop(1)


async def test_an_admission_that_is_never_submitted_gives_its_room_back() -> None:
    batcher = make(Recorder(), max_queue_size=2)
    await batcher.start()
    with pytest.raises(RuntimeError), batcher.admit(2):
        assert batcher.depth == 2
        raise RuntimeError("decode failed")
    assert batcher.depth == 0
    await batcher.stop(1)


async def test_an_item_past_its_deadline_is_not_computed() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=2)
    await batcher.start()
    first = await hold_first_batch(batcher, recorder)
    (expired,) = submit(batcher, [1], deadline=-1.0)
    (alive,) = submit(batcher, [2])
    recorder.gate.set()
    with pytest.raises(DeadlineExceeded):
        await expired
    assert (await alive).value == 20
    assert (await first).value == 0
    assert all(1 not in batch for batch in recorder.batches)
    assert batcher.stats.expired == 1
    await batcher.stop(1)


async def test_stop_drains_queued_work_before_returning() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=2)
    await batcher.start()
    first = await hold_first_batch(batcher, recorder)
    queued = submit(batcher, [1, 2, 3])
    stopping = asyncio.create_task(batcher.stop(10))
    await wait_until(lambda: not batcher.alive)
    with pytest.raises(NotReady):
        batcher.admit(1)  # no new work once stopping
    recorder.gate.set()
    await stopping
    assert (await first).value == 0
    assert [f.result().value for f in queued] == [10, 20, 30]


async def test_stop_does_not_wait_for_a_batch_whose_requests_all_gave_up() -> None:
    recorder = Recorder()
    batcher = make(recorder)
    await batcher.start()
    first = await hold_first_batch(batcher, recorder)
    first.cancel()  # its request timed out: the forward goes on, nobody waits for it
    async with asyncio.timeout(10):  # not the drain's 600 s: the held forward is not waited for
        await batcher.stop(600)
    recorder.gate.set()


async def test_stop_returns_once_every_queued_request_gave_up() -> None:
    """Items whose requests gave up while queued are dropped by the consumer; the drain ends with the last of them."""
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=2)
    await batcher.start()
    first = await hold_first_batch(batcher, recorder)
    queued = submit(batcher, [1, 2, 3])
    for future in [first, *queued]:
        future.cancel()
    stopping = asyncio.create_task(batcher.stop(600))
    recorder.gate.set()
    async with asyncio.timeout(10):
        await stopping
    assert recorder.batches == [[0]]


async def test_stop_after_its_timeout_fails_everything_still_pending() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=2)
    await batcher.start()
    first = await hold_first_batch(batcher, recorder)
    queued = submit(batcher, [1, 2, 3])
    await batcher.stop(0.05)
    recorder.gate.set()
    for future in [first, *queued]:
        assert isinstance(future.exception(), NotReady)


async def test_a_dead_consumer_fails_pending_work_and_is_not_alive() -> None:
    recorder = Recorder()
    batcher = make(recorder, max_batch_size=2)
    await batcher.start()
    first = await hold_first_batch(batcher, recorder)
    (queued,) = submit(batcher, [1])

    def broken(item: object) -> bool:
        raise RuntimeError("bug in the consumer")

    batcher._take = broken  # type: ignore[method-assign]
    recorder.gate.set()
    assert (await first).value == 0
    with pytest.raises(NotReady):
        await queued
    assert not batcher.alive
    with pytest.raises(NotReady):
        batcher.admit(1)
    await batcher.stop(1)


async def test_results_say_where_their_time_went_and_an_observer_sees_every_batch() -> None:
    recorder = Recorder()
    records: list[BatchRecord] = []
    config = BatchingConfig(max_batch_size=2, max_queue_delay_ms=0, max_queue_size=8)
    batcher: Batcher[int, int] = Batcher(recorder, config, name="test", on_batch=records.append)
    await batcher.start(warmup=[0])  # warm-up is not a served batch: not reported
    first = await hold_first_batch(batcher, recorder)
    queued = submit(batcher, [1, 2])
    recorder.gate.set()
    completed = await asyncio.gather(*queued)
    held = await first
    assert [c.batch_size for c in completed] == [2, 2] and held.batch_size == 1
    # The pair waited in the queue while the held batch ran.
    assert all(c.queue_wait_s > 0 for c in completed) and held.batch_s > 0
    recorder.poison = 3
    await asyncio.gather(*submit(batcher, [3]), return_exceptions=True)
    assert [(r.size, len(r.queue_waits_s), r.failed) for r in records] == [(1, 1, False), (2, 2, False), (1, 1, True)]
    assert records[1].run_s == completed[0].batch_s
    await batcher.stop(1)
