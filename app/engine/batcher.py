"""Stage 3, batch: one asyncio queue, one consumer task, and `max_in_flight` inference threads (one on a CPU; two on a
GPU, so that one batch's copies and decode overlap another's forward).

Requests are admitted first (`admit`), which reserves room for their images so that a full service says 503 at
once instead of growing a backlog. Room is counted twice: in images (`max_queue_size`), and in the encoded bytes
still being decoded (`max_queue_bytes`), since a large image's decode costs many times a small one's, and a backlog
of them would otherwise be admitted only to time out. Then each image is its own queue item with its own future. The
consumer opens a window at the first item and sends a batch when it is full or `max_queue_delay_ms` after that item
arrived.
Every future is resolved exactly once: cancelled items are skipped, expired ones get `DeadlineExceeded`, a failed
forward fails every request of its batch (an exception returned in an image's place fails that image alone), and
`stop` fails whatever is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import Generic, TypeVar

from app.config.settings import BatchingConfig
from app.engine.descriptions import BatchRecord
from app.errors import DeadlineExceeded, InferenceFailed, NotReady, QueueFull, ServeError

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(slots=True, eq=False)
class _Item(Generic[In, Out]):
    payload: In
    future: asyncio.Future[Completed[Out]]
    deadline: float
    enqueued_at: float
    trace: object | None  # the traced request it belongs to (`app.engine.tracing`), or None


@dataclass(frozen=True, slots=True)
class Completed(Generic[Out]):
    """One item's result and where its time went."""

    value: Out
    queue_wait_s: float  # from entering the queue to its batch starting
    batch_s: float  # its batch's `run_batch`, on the inference thread
    batch_size: int


@dataclass(slots=True)
class BatchStats:
    """What the consumer did; tests and metrics read it."""

    batches: int = 0
    images: int = 0
    skipped_cancelled: int = 0
    expired: int = 0
    failed_batches: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class Batcher(Generic[In, Out]):
    """Dynamic batching of single items into calls of `run_batch(list[In]) -> Sequence[Out]` on one thread."""

    def __init__(
        self,
        run_batch: Callable[[list[In]], Sequence[Out | BaseException]],
        config: BatchingConfig,
        *,
        name: str = "model",
        max_in_flight: int = 1,
        stats_history: int = 1024,
        on_batch: Callable[[BatchRecord], None] | None = None,
    ) -> None:
        self._run_batch = run_batch
        self._on_batch = on_batch
        self._config = config
        self._name = name
        self._max_delay_s = config.max_queue_delay_ms / 1000
        self._queue: asyncio.Queue[_Item[In, Out]] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix=f"infer-{name}")
        self._slots = asyncio.Semaphore(max_in_flight)
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # batches in flight
        self._reserved = 0  # images admitted and not yet taken by the consumer
        self._decoding_bytes = 0  # encoded bytes of admitted requests not yet decoded (submitted)
        self._collecting: list[_Item[In, Out]] = []  # taken off the queue for the next batch
        self._in_flight: list[list[_Item[In, Out]]] = []  # batches sent to `run_batch`, not yet resolved
        self._idle = asyncio.Event()
        self._idle.set()
        self._accepting = False
        self._stats_history = stats_history
        self.stats = BatchStats()

    @property
    def config(self) -> BatchingConfig:
        return self._config

    @property
    def alive(self) -> bool:
        """Accepting work, with a consumer that has not died."""
        return self._accepting and self._consuming

    @property
    def _consuming(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def depth(self) -> int:
        """Images admitted and not yet computed: being decoded, or queued."""
        return self._reserved

    @property
    def queued(self) -> int:
        """Images in the queue, ready for a batch."""
        return self._queue.qsize()

    async def start(self, warmup: list[In] | None = None) -> None:
        """Run `warmup` through the model once on the inference thread, then start taking work."""
        if self._task is not None:
            raise RuntimeError("batcher already started")
        if warmup:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._run_batch, warmup)
        self._task = asyncio.create_task(self._consume(), name=f"batcher-{self._name}")
        self._task.add_done_callback(self._on_consumer_done)
        self._accepting = True

    @property
    def decoding_bytes(self) -> int:
        """Encoded bytes admitted and still being decoded."""
        return self._decoding_bytes

    def admit(self, count: int, *, encoded_bytes: int = 0) -> Admission[In, Out]:
        """Reserve room for `count` images of `encoded_bytes` to decode, or refuse at once with 503. A request alone
        is always let in by its bytes (the body limit bounds it), so no request is too large for an idle model."""
        if not self.alive:
            raise NotReady(f"model {self._name!r} is not accepting requests")
        if self._reserved + count > self._config.max_queue_size:
            raise QueueFull(
                f"model {self._name!r} is at capacity ({self._config.max_queue_size} images queued); retry later"
            )
        limit = self._config.max_queue_bytes
        if self._decoding_bytes and self._decoding_bytes + encoded_bytes > limit:
            raise QueueFull(
                f"model {self._name!r} is at capacity ({self._decoding_bytes / 2**20:.1f} MiB of images being decoded, "
                f"the limit is {limit / 2**20:g} MiB); retry later"
            )
        self._reserved += count
        self._decoding_bytes += encoded_bytes
        self._idle.clear()
        return Admission(self, count, encoded_bytes)

    async def stop(self, timeout_s: float) -> None:
        """Stop accepting, let queued work finish for up to `timeout_s`, then fail what is left."""
        self._accepting = False
        if self._task is not None and self._consuming:
            try:
                async with asyncio.timeout(timeout_s):
                    await self._idle.wait()
            except TimeoutError:
                log.warning("model %r: drain timed out after %.1f s", self._name, timeout_s)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._tasks):  # past the drain timeout: stop waiting for batches still running
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._fail_all(NotReady(f"model {self._name!r} is shutting down"))
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- inside the batcher --------------------------------------------------------------------------------

    def _enqueue(self, payload: In, deadline: float, trace: object | None) -> asyncio.Future[Completed[Out]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Completed[Out]] = loop.create_future()
        future.add_done_callback(self._given_up)
        self._queue.put_nowait(_Item(payload, future, deadline, loop.time(), trace))
        return future

    def _given_up(self, future: asyncio.Future[Completed[Out]]) -> None:
        if future.cancelled():  # its request timed out or went away: maybe the last one a batch in flight served
            self._update_idle()

    def _release(self, count: int) -> None:
        self._reserved -= count
        self._update_idle()

    def _update_idle(self) -> None:
        """Idle: nothing admitted or collecting, and no request waiting for a batch in flight (a batch whose requests
        all gave up, by timeout or disconnect, still computes, but the drain need not wait for it)."""
        waited_for = any(not item.future.done() for batch in self._in_flight for item in batch)
        if self._reserved == 0 and not self._collecting and not waited_for:
            self._idle.set()

    async def _consume(self) -> None:
        """Take a free slot (one of `max_in_flight`), collect a batch for it, and run it without waiting for it."""
        while True:
            await self._slots.acquire()
            try:
                batch = await self._collect()
            except BaseException:
                self._slots.release()
                raise
            if not batch:  # every item taken had given up: that may have been the last thing a drain waited for
                self._slots.release()
                self._update_idle()
                continue
            self._in_flight.append(batch)
            self._collecting = []
            task = asyncio.create_task(self._run(batch), name=f"batch-{self._name}")
            self._tasks.add(task)
            task.add_done_callback(self._run_done)

    def _run_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:  # `_run` catches everything; a bug if not
            log.error("model %r: batch task failed", self._name, exc_info=task.exception())

    async def _run(self, batch: list[_Item[In, Out]]) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        started_ns = time.time_ns()
        waits = [started - item.enqueued_at for item in batch]
        traces = _traces(batch)
        try:
            outputs, run_s = await loop.run_in_executor(self._executor, self._checked_run, [i.payload for i in batch])
        except Exception as exc:
            self.stats.failed_batches += 1
            log.exception("model %r: forward of a batch of %d failed", self._name, len(batch))
            error = InferenceFailed("inference failed for this request's batch")
            error.__cause__ = exc
            for item in batch:
                _resolve(item.future, error=error)
            record = BatchRecord(len(batch), waits, loop.time() - started, True, started_ns, time.time_ns(), traces)
            self._record(record)
        else:
            for item, output, wait in zip(batch, outputs, waits, strict=True):
                if isinstance(output, BaseException):  # this image alone failed (e.g. it would not decode)
                    _resolve(item.future, error=output)
                else:
                    _resolve(item.future, result=Completed(output, wait, run_s, len(batch)))
            self._record(BatchRecord(len(batch), waits, run_s, False, started_ns, time.time_ns(), traces))
        # Not in a `finally`: if the batcher is stopped mid-batch, `_fail_all` resolves what is still in flight.
        self._in_flight.remove(batch)
        self._update_idle()

    async def _collect(self) -> list[_Item[In, Out]]:
        """Wait for a first item, then take more until the batch has enough live ones, its window has closed, or no
        other admitted image is left to wait for."""
        # Every item taken off the queue is in `_collecting` at once, so that a stop (or a bug) mid-collection
        # still resolves it; the ones that need no compute are filtered out at the end.
        taken: list[_Item[In, Out]] = []
        self._collecting = taken
        first = await self._queue.get()
        taken.append(first)
        live = int(self._take(first))
        window_end = first.enqueued_at + self._max_delay_s
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(window_end):
                # Wait only for images that are on their way (admitted: being decoded, or queued). With none, more
                # waiting could only add latency: a lone request at an idle model goes at once.
                while live < self._config.max_batch_size and self._reserved > 0:
                    item = await self._queue.get()  # returns without suspending while items are queued
                    taken.append(item)
                    live += self._take(item)
        taken[:] = [item for item in taken if not item.future.done()]
        if taken:
            self.stats.batches += 1
            self.stats.images += len(taken)
            self.stats.batch_sizes.append(len(taken))
            del self.stats.batch_sizes[: -self._stats_history]
        return taken

    def _take(self, item: _Item[In, Out]) -> bool:
        """Take an item off the queue; False when it needs no compute (its caller gave up or ran out of time)."""
        self._reserved -= 1
        if item.future.done():
            self.stats.skipped_cancelled += 1
            self._update_idle()
            return False
        if asyncio.get_running_loop().time() > item.deadline:
            self.stats.expired += 1
            _resolve(item.future, error=DeadlineExceeded("request deadline passed while queued"))
            self._update_idle()
            return False
        return True

    def _checked_run(self, payloads: list[In]) -> tuple[Sequence[Out | BaseException], float]:
        """On the inference thread: the batch function, its duration, and a check of one result per input."""
        started = time.perf_counter()
        outputs = self._run_batch(payloads)
        elapsed = time.perf_counter() - started
        if len(outputs) != len(payloads):
            raise RuntimeError(f"run_batch returned {len(outputs)} results for {len(payloads)} inputs")
        return outputs, elapsed

    def _record(self, record: BatchRecord) -> None:
        if self._on_batch is not None:
            try:
                self._on_batch(record)
            except Exception:  # an observer's bug must not stop the batcher
                log.exception("model %r: batch observer failed", self._name)

    def _on_consumer_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        log.error("model %r: batch consumer died; the model is not ready", self._name, exc_info=exc)
        self._accepting = False
        self._fail_all(NotReady(f"model {self._name!r} stopped working"))

    def _fail_all(self, error: ServeError) -> None:
        for item in [*self._collecting, *(item for batch in self._in_flight for item in batch)]:
            _resolve(item.future, error=error)
        self._collecting = []
        self._in_flight = []
        while not self._queue.empty():
            item = self._queue.get_nowait()
            self._reserved -= 1
            _resolve(item.future, error=error)
        self._update_idle()


class Admission(Generic[In, Out]):
    """Room reserved for one request's images; `submit` queues them (their decode is over: its bytes are released),
    leaving the block releases what was unused."""

    def __init__(self, batcher: Batcher[In, Out], count: int, encoded_bytes: int = 0) -> None:
        self._batcher = batcher
        self._unused = count
        self._decoding_bytes = encoded_bytes

    def submit(
        self, payloads: Sequence[In], deadline: float, trace: object | None = None
    ) -> list[asyncio.Future[Completed[Out]]]:
        if len(payloads) > self._unused:
            raise ValueError(f"admitted {self._unused} images, submitting {len(payloads)}")
        self._decoded()
        if not self._batcher._consuming:  # a stop lets admitted requests in; a dead consumer does not
            raise NotReady("model is not accepting requests")
        self._unused -= len(payloads)
        return [self._batcher._enqueue(p, deadline, trace) for p in payloads]

    def _decoded(self) -> None:
        self._batcher._decoding_bytes -= self._decoding_bytes
        self._decoding_bytes = 0

    def __enter__(self) -> Admission[In, Out]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._decoded()
        if self._unused:
            self._batcher._release(self._unused)
            self._unused = 0


def _traces(batch: list[_Item[In, Out]]) -> tuple[object, ...]:
    """The traced requests a batch serves, each once (a request's images share one handle), in order."""
    distinct: dict[int, object] = {}
    for item in batch:
        if item.trace is not None:
            distinct.setdefault(id(item.trace), item.trace)
    return tuple(distinct.values())


def _resolve(
    future: asyncio.Future[Completed[Out]], *, result: Completed[Out] | None = None, error: BaseException | None = None
) -> None:
    """Resolve a future unless its caller already gave up on it (Ray Serve PR #41199)."""
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)  # type: ignore[arg-type]
