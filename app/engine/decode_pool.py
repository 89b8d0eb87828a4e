"""The decode threads, and what is left of them when a decode outlives its request.

A decode cannot be stopped from outside: PIL's decoders and resizes run in C, and Python cannot interrupt a thread.
The header checks (`app.pipeline.image_scan`) refuse the known ways to make one image cost more than its pixels; this
pool is the defence behind them. `workers` decodes run at a time. A decode still running when its request has given
up (at its deadline, or on a client's hang-up) stops counting against them, and one of `spare` more threads takes the
next image meanwhile, so one pathological image slows the service instead of stopping it. While every thread is held
by an overdue decode, the pool is `exhausted` and readiness says so, until they end.
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


class DecodePool:
    """`workers` threads' worth of decoding, with `spare` threads (default: as many again) for overdue decodes."""

    def __init__(self, workers: int, *, spare: int | None = None) -> None:
        self.workers = workers
        self.spare = workers if spare is None else spare
        self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="decode")
        self._slots = asyncio.Semaphore(workers)
        self._deadlines: dict[int, float] = {}  # running call -> its request's deadline (time.monotonic)
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self.overruns = 0  # calls that ended after their deadline

    @property
    def threads(self) -> int:
        return self.workers + self.spare

    async def run(self, fn: Callable[..., T], *args: Any, deadline: float = math.inf) -> T:
        """`fn(*args)` on a decode thread, once one of the `workers` slots is free. `deadline` is on the event
        loop's clock (`time.monotonic`): a call still running past it is overdue. Cancelling the caller frees the
        slot at once, whether or not the call has started; a call not yet started never starts."""
        async with self._slots:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._call, fn, args, deadline)

    def overdue(self) -> int:
        """Calls running past their deadline: threads that no request is waiting for."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for deadline in self._deadlines.values() if deadline < now)

    @property
    def exhausted(self) -> bool:
        """Every thread is held by an overdue call: no image can be decoded until one ends."""
        return self.overdue() >= self.threads

    def shutdown(self) -> None:
        """Queued calls are dropped; running ones end on their own (a thread cannot be stopped)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _call(self, fn: Callable[..., T], args: tuple[Any, ...], deadline: float) -> T:
        key = next(self._ids)
        with self._lock:
            self._deadlines[key] = deadline
        try:
            return fn(*args)
        finally:
            with self._lock:
                del self._deadlines[key]
            late_s = time.monotonic() - deadline
            if late_s > 0:
                self.overruns += 1
                log.warning(
                    "a decode ended %.2f s after its request's deadline",
                    late_s,
                    extra={"fields": {"late_s": round(late_s, 3)}},
                )
