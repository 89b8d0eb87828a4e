"""Per-call telemetry of the gRPC service, as `app.http.telemetry` is per-request for HTTP: the request id, one
access-log line, and the request metrics (labelled with the full method path and the status code's name).

The servicer adds what it knows (model, images, timings, the domain error) to the call's `CallRecord` (`this_call`);
this reads it when the call is answered. Everything per call is here, in `TelemetryInterceptor._observed`. The log
line never carries request data or metadata other than the request id.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import grpc

from app.errors import ClientDisconnected, ServeError
from app.grpc.methods import Around, AroundCalls, Context, is_probe, status_code
from app.observability.logs import request_id
from app.observability.metrics import Metrics

log = logging.getLogger("app.access")

REQUEST_ID = "x-request-id"


@dataclass(slots=True)
class CallRecord:
    """What the servicer learns of a call, for its access line and metrics (HTTP's `request.state`)."""

    request_id: str = ""
    model: str = ""
    log_fields: dict[str, Any] = field(default_factory=dict)
    error: ServeError | None = None  # the domain error the call was answered with


_CALL: ContextVar[CallRecord | None] = ContextVar("vit_grpc_call", default=None)


def this_call() -> CallRecord:
    """The record of the call being handled (a throwaway one where no `TelemetryInterceptor` observes it)."""
    return _CALL.get() or CallRecord()


class TelemetryInterceptor(AroundCalls):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def around(self, call: grpc.HandlerCallDetails) -> Around:
        """Every served method's calls (an unserved one's path would be an unbounded label: it never gets here)."""
        method = call.method
        return lambda context: self._observed(method, context)

    @asynccontextmanager
    async def _observed(self, method: str, context: Context) -> AsyncIterator[None]:
        started = time.perf_counter()
        record = CallRecord(request_id=_request_id(context))
        token = _CALL.set(record)
        status = grpc.StatusCode.UNKNOWN  # what the client gets if the handler raises past its own error answers
        self.metrics.inflight.inc()
        try:
            await context.send_initial_metadata(((REQUEST_ID, record.request_id),))
            yield
            status = status_code(context) or grpc.StatusCode.OK
        except grpc.aio.AbortError:
            status = status_code(context) or grpc.StatusCode.UNKNOWN
            raise
        except asyncio.CancelledError:  # the client cancelled, or its deadline passed: nobody reads an answer
            status = grpc.StatusCode.CANCELLED
            record.error = record.error or ClientDisconnected("the client cancelled the call")
            raise
        finally:
            self.metrics.inflight.dec()
            _CALL.reset(token)
            self._record(method, record, status, time.perf_counter() - started)

    def _record(self, method: str, record: CallRecord, status: grpc.StatusCode, elapsed: float) -> None:
        label = self.metrics.model_label(record.model)
        self.metrics.requests.labels(label, method, status.name).inc()
        self.metrics.request_duration.labels(label, method).observe(elapsed)
        if record.error is not None:
            self.metrics.request_rejected(record.model, record.error)
        fields: dict[str, Any] = {
            "request_id": record.request_id,
            "method": "grpc",
            "path": method,
            "status": status.name,
            "total_ms": round(elapsed * 1000, 3),
        }
        if record.model:
            fields["model"] = record.model
        fields.update(record.log_fields)
        level = logging.DEBUG if is_probe(method) else logging.INFO
        log.log(level, "grpc %s %s", method, status.name, extra={"fields": fields})


def _request_id(context: Context) -> str:
    sent = next((value for key, value in context.invocation_metadata() or () if key == REQUEST_ID), None)
    return request_id(sent if isinstance(sent, str) else None)
