"""The interceptors of the gRPC server, outermost first: the server span when tracing is on (as HTTP's tracing
middleware), telemetry (every call, refused ones included, as HTTP's telemetry middleware sees every answer), then API
keys when any are set."""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from app.config.settings import Settings
from app.grpc.auth import ApiKeyInterceptor
from app.grpc.telemetry import TelemetryInterceptor
from app.observability.metrics import Metrics
from app.protocols.api_keys import ApiKeys

if TYPE_CHECKING:
    from app.observability.tracing import Tracing


def interceptors(
    settings: Settings, metrics: Metrics, tracing: Tracing | None = None
) -> list[grpc.aio.ServerInterceptor]:
    chain: list[grpc.aio.ServerInterceptor] = [TelemetryInterceptor(metrics)]
    if tracing is not None:
        from app.grpc.tracing import TracingInterceptor  # only when traced: opentelemetry is an extra

        chain.insert(0, TracingInterceptor(tracing))
    if settings.api_keys:
        chain.append(ApiKeyInterceptor(ApiKeys([key.get_secret_value() for key in settings.api_keys])))
    return chain
