"""The decode threads, and what is left of them when a decode outlives its request.

A decode cannot be stopped from outside: PIL's decoders and resizes run in C, and Python cannot interrupt a thread.
The header checks (`app.pipeline.image_scan`) refuse the known ways to make one image cost more than its pixels; this
pool is the defence behind them. `workers` threads decode, fed straight from their executor's queue (no round trip
through the event loop between two images). A decode still running when its request has given up (at its deadline,
or on a client's hang-up) is overdue: while a worker is held by one, new images go to `spare` more threads, so one
pathological image slows the service instead of stopping it. While every thread is held by an overdue decode, the
pool is `exhausted` and readiness says so, until they end.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class _Threads:
    """One executor and the deadlines of the calls running on it."""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.executor = ThreadPoolExecutor(size, thread_name_prefix=name) if size else None
        self.deadlines: dict[int, float] = {}  # running call -> its request's deadline (time.monotonic)

    def overdue(self, now: float) -> int:
        return sum(1 for deadline in self.deadlines.values() if deadline < now)


class DecodePool:
    """`workers` threads of decoding, with `spare` threads (default: as many again) that take the work while overdue
    decodes hold workers."""

    def __init__(self, workers: int, *, spare: int | None = None) -> None:
        self.workers = workers
        self.spare = workers if spare is None else spare
        self._main = _Threads(workers, "decode")
        self._spare = _Threads(self.spare, "decode-spare")
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.overruns = 0  # calls that ended after their deadline

    @property
    def threads(self) -> int:
        return self.workers + self.spare

    async def run(self, fn: Callable[..., T], *args: Any, deadline: float = math.inf) -> T:
        """`fn(*args)` on a decode thread. `deadline` is on the event loop's clock (`time.monotonic`): a call still
        running past it is overdue. Cancelling the caller before the call starts means it never starts."""
        threads = self._choose()
        assert threads.executor is not None  # a pool of size 0 is never chosen
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(threads.executor, self._call, threads, fn, args, deadline)

    def overdue(self) -> int:
        """Calls running past their deadline: threads that no request is waiting for."""
        now = time.monotonic()
        with self._lock:
            return self._main.overdue(now) + self._spare.overdue(now)

    @property
    def exhausted(self) -> bool:
        """Every thread is held by an overdue call: no image can be decoded until one ends."""
        return self.overdue() >= self.threads

    def shutdown(self) -> None:
        """Queued calls are dropped; running ones end on their own (a thread cannot be stopped)."""
        for threads in (self._main, self._spare):
            if threads.executor is not None:
                threads.executor.shutdown(wait=False, cancel_futures=True)

    def _choose(self) -> _Threads:
        """The workers, unless overdue decodes hold more of them than of the spare threads."""
        now = time.monotonic()
        with self._lock:
            held = self._main.overdue(now)
            if held == 0 or self._spare.size == 0:
                return self._main
            free_main = self._main.size - held
            free_spare = self._spare.size - self._spare.overdue(now)
            return self._spare if free_spare > free_main else self._main

    def _call(self, threads: _Threads, fn: Callable[..., T], args: tuple[Any, ...], deadline: float) -> T:
        key = next(self._ids)
        with self._lock:
            threads.deadlines[key] = deadline
        try:
            return fn(*args)
        finally:
            with self._lock:
                del threads.deadlines[key]
            late_s = time.monotonic() - deadline
            if late_s > 0:
                self.overruns += 1
                log.warning(
                    "a decode ended %.2f s after its request's deadline",
                    late_s,
                    extra={"fields": {"late_s": round(late_s, 3)}},
                )
