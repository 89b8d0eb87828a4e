"""The server span of each gRPC call (`Tracing.server_span`), when tracing is on; the probes and health checks are
not traced. `interceptors(settings, metrics, tracing)` puts it first, around every other interceptor."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import grpc

from app.grpc.methods import Around, AroundCalls, Context, is_probe, status_code

if TYPE_CHECKING:
    from app.observability.tracing import Tracing

# The codes that are the service's fault (OpenTelemetry's gRPC conventions for server spans); the rest, the client's.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


class TracingInterceptor(AroundCalls):
    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def around(self, call: grpc.HandlerCallDetails) -> Around | None:
        method = call.method
        return None if is_probe(method) else lambda context: self._traced(method, context)

    @asynccontextmanager
    async def _traced(self, method: str, context: Context) -> AsyncIterator[None]:
        service, _, name = method.lstrip("/").partition("/")
        metadata = {key: value for key, value in context.invocation_metadata() or () if isinstance(value, str)}
        attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
        with self.tracing.server_span(f"{service}/{name}", metadata, attributes) as span:
            status = grpc.StatusCode.UNKNOWN  # if the handler raises past its own error answers
            try:
                yield
                status = status_code(context) or grpc.StatusCode.OK
            except grpc.aio.AbortError:
                status = status_code(context) or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                status = grpc.StatusCode.CANCELLED
                raise
            finally:
                span.set_attributes({"rpc.grpc.status_code": status.value[0]})
                if status in SERVER_ERRORS:
                    span.set_error(status.name)
