"""OpenTelemetry traces (the `otel` extra: this module is imported only when tracing is on).

A server span per request (`server_span`, for HTTP and gRPC alike), continuing the caller's W3C trace; the engine's
stages of that request (`preprocess`, `queue`) as its children; and one `forward` span per batch, in a trace of its
own, linked from every request it served: one forward serves many traces, so links, not parents.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import cast

from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import OTELResourceDetector, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from app import __version__
from app.engine.descriptions import BatchRecord
from app.errors import ModelLoadError

log = logging.getLogger(__name__)

SERVICE_NAME = "vit-serve"  # unless OTEL_SERVICE_NAME (or OTEL_RESOURCE_ATTRIBUTES) says otherwise
SHUTDOWN_TIMEOUT_S = 5.0  # at exit, for the spans still queued to be exported
OTLP_EXPORTERS = {"grpc": "otlp_proto_grpc", "http/protobuf": "otlp_proto_http"}  # the OTLP protocols -> entry points


class RequestSpan:
    """A request's server span, as a protocol layer sees it: what it adds once the request has been answered."""

    __slots__ = ("_span",)

    def __init__(self, span: Span) -> None:
        self._span = span

    @property
    def trace_id(self) -> str | None:
        """The trace's id, 32 hex digits (for the access log); None for none (the SDK disabled)."""
        context = self._span.get_span_context()
        return trace.format_trace_id(context.trace_id) if context.is_valid else None

    def rename(self, name: str) -> None:
        """Once routed: the span's name, e.g. `POST /v1/classify` (the route's template, never the raw path)."""
        self._span.update_name(name)

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        self._span.set_attributes(attributes)

    def set_error(self, description: str | None = None) -> None:
        """The request failed by the service's fault (HTTP 5xx, a gRPC INTERNAL or UNAVAILABLE)."""
        self._span.set_status(Status(StatusCode.ERROR, description))


class Tracing:
    """The service's traces: `server_span` for the protocol layers, and the engine's `Tracer` (`Engine.trace`).

    `provider`: a tracer provider of the caller's (tests: an in-memory exporter's); `from_environment` makes the
    service's own."""

    def __init__(self, provider: trace.TracerProvider, *, owned: bool = False) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("vit-serve", __version__)
        self._owned = owned  # made here: shut down here

    @classmethod
    def from_environment(cls) -> Tracing:
        """A provider of the service's own (each process its own, made in `serve`): the service's resource, the
        sampler of OTEL_TRACES_SAMPLER, and each exporter of OTEL_TRACES_EXPORTER (default otlp, over
        OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL: grpc by default, or http/protobuf) behind a batch span processor.
        Not made the global provider: FastAPI's own telemetry would then trace every request a second time."""
        defaults = Resource.create({"service.name": SERVICE_NAME, "service.version": __version__})
        resource = defaults.merge(OTELResourceDetector().detect())  # OTEL_SERVICE_NAME over the default name
        provider = TracerProvider(resource=resource, shutdown_on_exit=False)  # shut down by `shutdown`, bounded
        for exporter in exporters(os.environ):
            provider.add_span_processor(BatchSpanProcessor(exporter))
        return cls(provider, owned=True)

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Export the spans still queued and stop, waiting at most `timeout_s` (a collector that does not answer
        must not hold the exit up)."""
        if not self._owned or not isinstance(self.provider, TracerProvider):
            return
        done = threading.Thread(target=self.provider.shutdown, name="otel-shutdown", daemon=True)
        done.start()
        done.join(timeout_s)
        if done.is_alive():
            log.warning("tracing: spans not exported within %g s at exit were dropped", timeout_s)

    @contextmanager
    def server_span(
        self, name: str, carrier: Mapping[str, str], attributes: Mapping[str, AttributeValue]
    ) -> Iterator[RequestSpan]:
        """The server span of one request, current while the block runs (the engine's stages become its children).
        `carrier`: the request's headers (HTTP) or metadata (gRPC), lower-case names, from which the configured
        propagator (W3C `traceparent` and `tracestate` by default) extracts the caller's trace. An exception leaving
        the block is recorded on the span; whether it is an error is the caller's to say (`RequestSpan.set_error`):
        a client's mistake is not."""
        with self._tracer.start_as_current_span(
            name,
            context=propagate.extract(carrier),
            kind=SpanKind.SERVER,
            attributes=attributes,
            set_status_on_exception=False,
        ) as span:
            yield RequestSpan(span)

    # -- the engine's `Tracer` ------------------------------------------------------------------------------

    def request(self, model: str, images: int) -> object | None:
        span = trace.get_current_span()
        if not span.is_recording():  # no request span here, or not sampled: nothing to add to
            return None
        span.set_attributes({"vit.model": model, "vit.images": images})
        return span

    def stage(self, request: object, name: str, start_ns: int, end_ns: int, error: BaseException | None) -> None:
        parent = trace.set_span_in_context(cast(Span, request))
        span = self._tracer.start_span(name, context=parent, start_time=start_ns)
        if error is not None:
            _failed(span, error)
        span.end(end_time=end_ns)

    def batch(self, model: str, record: BatchRecord) -> None:
        links = [Link(cast(Span, request).get_span_context()) for request in record.traces]
        span = self._tracer.start_span(
            "forward",
            context=Context(),  # a root: never a child of whatever was current when the batcher started
            links=links,
            start_time=record.started_ns,
            attributes={"vit.model": model, "vit.batch.size": record.size},
        )
        if record.failed:
            span.set_status(Status(StatusCode.ERROR, "the batch's forward failed"))
        span.end(end_time=record.ended_ns)


def exporters(environ: Mapping[str, str]) -> list[SpanExporter]:
    """The span exporters OTEL_TRACES_EXPORTER names (comma-separated; `none` for none), each configured by its own
    OTEL_EXPORTER_* variables; `otlp` is the one of the OTLP protocol set."""
    found: list[SpanExporter] = []
    for name in (part.strip() for part in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")):
        if name in ("", "none"):
            continue
        if name == "otlp":
            protocol = (
                environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
                or "grpc"
            )
            if protocol not in OTLP_EXPORTERS:
                raise ModelLoadError(f"OTLP protocol {protocol!r} is not supported: grpc or http/protobuf")
            name = OTLP_EXPORTERS[protocol]
        entry = next(iter(entry_points(group="opentelemetry_traces_exporter", name=name)), None)
        if entry is None:
            raise ModelLoadError(f"OTEL_TRACES_EXPORTER: no span exporter named {name!r} is installed")
        found.append(cast(SpanExporter, entry.load()()))
    return found


def _failed(span: Span, error: BaseException) -> None:
    span.record_exception(error)
    span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
