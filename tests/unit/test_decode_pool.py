"""The decode pool: a decode that outlives its request holds a thread, a spare takes the work, and the pool says when
none is left. Decodes are held by events; deadlines are set in the past, so nothing depends on the clock."""

from __future__ import annotations

import asyncio
import threading
import time

from app.engine.decode_pool import DecodePool
from tests.support.waiting import wait_until


class Stuck:
    """A decode that runs until released, as a pathological image would."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self) -> str:
        self.entered.set()
        assert self.release.wait(30), "never released"
        return "done late"


async def start_overdue(pool: DecodePool, stuck: Stuck) -> asyncio.Task[str]:
    """A call whose request's deadline has passed, started and then given up on (as the request's timeout does)."""
    task = asyncio.create_task(pool.run(stuck, deadline=time.monotonic() - 1))
    assert await asyncio.to_thread(stuck.entered.wait, 10)
    task.cancel()
    return task


async def test_an_overdue_decode_frees_its_slot_and_a_spare_thread_decodes_meanwhile() -> None:
    pool = DecodePool(1, spare=1)
    stuck = Stuck()
    await start_overdue(pool, stuck)
    assert pool.overdue() == 1 and not pool.exhausted

    assert await pool.run(lambda: "next image") == "next image"  # on the spare thread, at once

    stuck.release.set()
    pool.shutdown()


async def test_the_pool_is_exhausted_while_every_thread_holds_an_overdue_decode_and_recovers_after() -> None:
    pool = DecodePool(1, spare=1)
    stuck = [Stuck(), Stuck()]
    for one in stuck:
        await start_overdue(pool, one)
    assert (pool.overdue(), pool.exhausted) == (2, True)
    waiting = asyncio.create_task(pool.run(lambda: "queued image"))

    stuck[0].release.set()  # one thread comes back: the queued image is decoded, the pool is no longer exhausted
    assert await waiting == "queued image"
    assert not pool.exhausted
    stuck[1].release.set()
    await wait_until(lambda: pool.overdue() == 0)
    assert pool.overruns == 2
    pool.shutdown()


async def test_workers_bound_the_decodes_that_run_at_once() -> None:
    pool = DecodePool(2, spare=2)
    running, most = 0, 0
    lock = threading.Lock()
    two_running, gate = threading.Event(), threading.Event()

    def decode() -> None:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            if running == 2:
                two_running.set()
        gate.wait(10)
        with lock:
            running -= 1

    calls = [asyncio.create_task(pool.run(decode)) for _ in range(6)]
    assert await asyncio.to_thread(two_running.wait, 10)
    gate.set()
    await asyncio.gather(*calls)
    assert most == 2  # the spare threads are for overdue decodes only
    pool.shutdown()
