"""What the engine tells a tracer, if one is set (`Engine.trace`): each request's stages, and each batch's requests.

The engine knows nothing of OpenTelemetry (that is `app.observability.tracing`): a traced request is an opaque
handle, which the engine captures when the request starts, carries with each of its queued images, and hands back in
the stages it reports and in the `BatchRecord` of every batch that served one of its images (`BatchRecord.traces`).
Untraced (`NO_TRACER`, the default), each image carries a None and nothing else happens.
"""

from __future__ import annotations

import time
from typing import Protocol

from app.engine.descriptions import BatchRecord


class Tracer(Protocol):
    def request(self, model: str, images: int) -> object | None:
        """The traced request being served in the caller's context, told its model and image count; an opaque
        handle, or None when the request is not traced (or not sampled)."""

    def stage(self, request: object, name: str, start_ns: int, end_ns: int, error: BaseException | None) -> None:
        """A stage of `request` is over (`preprocess`, `queue`): wall-clock times in ns (`time.time_ns`), and the
        error that ended it, if any."""

    def batch(self, model: str, record: BatchRecord) -> None:
        """A batch ran (or failed) that served the traced requests `record.traces`."""


class _NoTracer:
    def request(self, model: str, images: int) -> object | None:
        return None

    def stage(self, request: object, name: str, start_ns: int, end_ns: int, error: BaseException | None) -> None:
        pass

    def batch(self, model: str, record: BatchRecord) -> None:
        pass


NO_TRACER: Tracer = _NoTracer()


class Stage:
    """The stage a request is in, reported to the tracer when it ends (nothing is done for an untraced request)."""

    __slots__ = ("name", "started_ns", "trace", "tracer")

    def __init__(self, tracer: Tracer, trace: object | None, name: str) -> None:
        self.tracer = tracer
        self.trace = trace
        self.name = name
        self.started_ns = time.time_ns() if trace is not None else 0

    def next(self, name: str) -> Stage:
        """This stage is over, without error; the next one starts."""
        if self.trace is None:
            return self
        self.end()
        return Stage(self.tracer, self.trace, name)

    def end(self, *, error: BaseException | None = None, seconds: float | None = None) -> None:
        """This stage is over: now, or `seconds` after it started."""
        if self.trace is None:
            return
        ended_ns = time.time_ns() if seconds is None else self.started_ns + round(seconds * 1e9)
        self.tracer.stage(self.trace, self.name, self.started_ns, ended_ns, error)


NO_STAGE = Stage(NO_TRACER, None, "none")  # no stage at all: ending it does nothing
