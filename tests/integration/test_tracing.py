"""OpenTelemetry traces: a server span per request in the caller's trace, the engine's stages as its children, one
forward span per batch linked from every request it served; nothing for the probes, nothing at all when off."""

from __future__ import annotations

import asyncio
import http.server
import os
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_span_id, format_trace_id

from app.config.settings import BatchingConfig, Settings
from app.engine.facade import Engine
from app.errors import ModelLoadError
from app.grpc.interceptors import interceptors
from app.grpc.proto import inference_pb2 as pb
from app.grpc.proto import inference_pb2_grpc
from app.grpc.servicer import InferenceServicer
from app.http.app import create_app
from app.observability.tracing import Tracing, exporters
from app.protocols.oip.tensors import pack_bytes
from app.serve.tracing import start_tracing, wanted
from tests.support.fakes import FakeViT, distinct_colors, fake_engine, fake_served_model, image_bytes, served_model_of
from tests.support.processes import free_port, start, stop, wait_ready, write_tiny_model
from tests.support.waiting import wait_until

PNG = {"Content-Type": "image/png"}
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


def traceparent(trace_id: str = CALLER_TRACE, span_id: str = CALLER_SPAN, *, sampled: bool = True) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"}


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Tracing:
    """Tracing to a provider of the test's own, exporting each span as it ends (never the global provider)."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return Tracing(provider)


@asynccontextmanager
async def traced(engine: Engine, tracing: Tracing | None) -> AsyncIterator[httpx.AsyncClient]:
    """The real app, traced to `tracing`, over real ASGI in this event loop (as `serve_in_process`)."""
    app: FastAPI = create_app(Settings(drain_timeout_s=5), engine, tracing=tracing)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client,
    ):
        await app.state.warming
        yield client


def named(spans: tuple[ReadableSpan, ...] | list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [span for span in spans if span.name == name]


def only(spans: list[ReadableSpan]) -> ReadableSpan:
    assert len(spans) == 1, [span.name for span in spans]
    return spans[0]


def children(spans: tuple[ReadableSpan, ...], parent: ReadableSpan) -> list[str]:
    return sorted(s.name for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id)


def linked_traces(span: ReadableSpan) -> list[str]:
    return [format_trace_id(link.context.trace_id) for link in span.links]


async def test_a_request_continues_its_callers_trace_through_every_stage(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    async with traced(fake_engine(), tracing) as client:
        response = await client.post("/v1/classify", content=image_bytes((255, 0, 0)), headers={**PNG, **traceparent()})
        assert response.status_code == 200
    spans = exporter.get_finished_spans()

    server = only(named(spans, "POST /v1/classify"))
    assert server.kind is SpanKind.SERVER
    assert format_trace_id(server.context.trace_id) == CALLER_TRACE
    assert server.parent is not None and format_span_id(server.parent.span_id) == CALLER_SPAN
    assert server.attributes is not None
    assert dict(server.attributes) == {
        "http.request.method": "POST",
        "url.path": "/v1/classify",
        "url.scheme": "http",
        "http.route": "/v1/classify",
        "http.response.status_code": 200,
        "vit.model": "fake",
        "vit.images": 1,
    }
    assert server.status.status_code is StatusCode.UNSET
    assert children(spans, server) == ["preprocess", "queue"]
    for stage in (only(named(spans, "preprocess")), only(named(spans, "queue"))):
        assert stage.start_time is not None and stage.end_time is not None
        assert server.start_time is not None and server.end_time is not None
        assert server.start_time <= stage.start_time <= stage.end_time <= server.end_time

    forward = only(named(spans, "forward"))
    assert forward.parent is None  # a trace of its own: one forward serves many requests' traces
    assert format_trace_id(forward.context.trace_id) != CALLER_TRACE
    assert [link.context.span_id for link in forward.links] == [server.context.span_id]
    assert linked_traces(forward) == [CALLER_TRACE]
    assert forward.attributes is not None
    assert dict(forward.attributes) == {"vit.model": "fake", "vit.batch.size": 1}


async def test_one_forward_span_is_linked_from_every_request_of_its_batch(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    model = FakeViT()
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_ms=0, max_queue_size=64)
    async with traced(fake_engine(fake_served_model(module=model, batching=batching)), tracing) as client:
        served = served_model_of(client)
        model.batch_sizes.clear()
        model.hold()  # a first request holds the forward, while three others, from three traces, queue up behind it
        first = asyncio.create_task(client.post("/v1/classify", content=image_bytes((1, 2, 3)), headers=PNG))
        await model.wait_until_in_forward()
        traces = [f"{n:032x}" for n in (0xA1, 0xB2, 0xC3)]
        two = [("f", (f"{i}.png", image_bytes(c), "image/png")) for i, c in enumerate(distinct_colors(2))]
        requests = [
            client.post("/v1/classify", files=two, headers=traceparent(traces[0])),  # two images, one request
            client.post("/v1/classify", content=image_bytes((9, 9, 9)), headers={**PNG, **traceparent(traces[1])}),
            client.post("/v1/classify", content=image_bytes((7, 7, 7)), headers={**PNG, **traceparent(traces[2])}),
        ]
        waiting = [asyncio.create_task(request) for request in requests]
        await wait_until(lambda: served.batcher.queued == 4)
        model.release()
        answers = await asyncio.gather(first, *waiting)
        assert [answer.status_code for answer in answers] == [200] * 4
    assert model.batch_sizes == [1, 4]
    spans = exporter.get_finished_spans()

    forwards = named(spans, "forward")
    assert len(forwards) == 2
    shared = only([span for span in forwards if span.attributes and span.attributes["vit.batch.size"] == 4])
    assert sorted(linked_traces(shared)) == traces  # one link per request, though one request sent two images
    servers = {format_trace_id(s.context.trace_id): s for s in named(spans, "POST /v1/classify")}
    assert {link.context.span_id for link in shared.links} == {servers[t].context.span_id for t in traces}
    two_images = servers[traces[0]].attributes
    assert two_images is not None and two_images["vit.images"] == 2


async def test_grpc_calls_are_traced_as_http_ones_and_share_the_forward_span(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    """A gRPC call continues its caller's trace (the `traceparent` metadata) with the same stages; a gRPC and an HTTP
    request in one batch: one forward span, linked from both; the probes and a client's error are no error spans."""
    model = FakeViT()
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_ms=0, max_queue_size=64)
    settings = Settings(drain_timeout_s=5)
    async with traced(fake_engine(fake_served_model(module=model, batching=batching)), tracing) as client:
        metrics = client._transport.app.state.metrics  # type: ignore[attr-defined]
        server = grpc.aio.server(interceptors=interceptors(settings, metrics, tracing))
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(client._transport.app.state.engine, settings),  # type: ignore[attr-defined]
            server,
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)  # type: ignore[no-untyped-call]
                served = served_model_of(client)
                model.batch_sizes.clear()
                model.hold()  # a first request holds the forward while a gRPC and an HTTP request queue behind it
                first = asyncio.create_task(client.post("/v1/classify", content=image_bytes((1, 2, 3)), headers=PNG))
                await model.wait_until_in_forward()
                grpc_trace, http_trace = f"{0xD4:032x}", f"{0xE5:032x}"
                request = pb.ModelInferRequest(model_name="fake", id="traced")
                request.inputs.add(name="IMAGE", datatype="BYTES", shape=[1, 1])
                request.raw_input_contents.append(pack_bytes([image_bytes((9, 9, 9))]))
                metadata = tuple(traceparent(grpc_trace).items())

                async def infer() -> pb.ModelInferResponse:
                    response: pb.ModelInferResponse = await stub.ModelInfer(request, metadata=metadata)
                    return response

                over_grpc = asyncio.create_task(infer())
                over_http = asyncio.create_task(
                    client.post(
                        "/v1/classify", content=image_bytes((7, 7, 7)), headers={**PNG, **traceparent(http_trace)}
                    )
                )
                await wait_until(lambda: served.batcher.queued == 2)
                model.release()
                assert (await first).status_code == 200 and (await over_http).status_code == 200
                assert (await over_grpc).id == "traced"
                await stub.ServerLive(pb.ServerLiveRequest())
                with pytest.raises(grpc.aio.AioRpcError) as unknown:
                    await stub.ModelInfer(pb.ModelInferRequest(model_name="nope"), metadata=metadata)
                assert unknown.value.code() is grpc.StatusCode.NOT_FOUND
        finally:
            await server.stop(grace=None)
    assert model.batch_sizes == [1, 2]
    spans = exporter.get_finished_spans()

    calls = named(spans, "inference.GRPCInferenceService/ModelInfer")
    assert len(calls) == 2 and {span.kind for span in calls} == {SpanKind.SERVER}  # ServerLive: no span
    call = only([span for span in calls if span.attributes and span.attributes["rpc.grpc.status_code"] == 0])
    assert format_trace_id(call.context.trace_id) == grpc_trace
    assert call.parent is not None and format_span_id(call.parent.span_id) == CALLER_SPAN
    assert call.attributes is not None and call.attributes["vit.model"] == "fake" and call.attributes["vit.images"] == 1
    assert children(spans, call) == ["preprocess", "queue"]
    not_found = only([span for span in calls if span is not call])
    assert not_found.attributes is not None and not_found.attributes["rpc.grpc.status_code"] == 5
    assert not_found.status.status_code is StatusCode.UNSET  # the client's error, not the service's
    shared = only([s for s in named(spans, "forward") if s.attributes and s.attributes["vit.batch.size"] == 2])
    assert sorted(linked_traces(shared)) == sorted([grpc_trace, http_trace])


async def test_probes_and_metrics_are_not_traced(tracing: Tracing, exporter: InMemorySpanExporter) -> None:
    async with traced(fake_engine(), tracing) as client:
        for path in ("/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"):
            assert (await client.get(path, headers=traceparent())).status_code == 200
        assert exporter.get_finished_spans() == ()
        assert (await client.get("/v1/models", headers=traceparent())).status_code == 200
    assert [span.name for span in exporter.get_finished_spans()] == ["GET /v1/models"]


async def test_a_bad_image_fails_its_preprocess_span_and_is_not_a_server_error(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    async with traced(fake_engine(), tracing) as client:
        response = await client.post("/v1/classify", content=b"not an image", headers={**PNG, **traceparent()})
        assert response.status_code == 415
    spans = exporter.get_finished_spans()
    server = only(named(spans, "POST /v1/classify"))
    assert server.attributes is not None and server.attributes["http.response.status_code"] == 415
    assert server.status.status_code is StatusCode.UNSET  # the client's mistake, not the service's
    assert children(spans, server) == ["preprocess"]
    preprocess = only(named(spans, "preprocess"))
    assert preprocess.status.status_code is StatusCode.ERROR
    assert [event.name for event in preprocess.events] == ["exception"]
    assert named(spans, "forward") == []


async def test_a_failed_forward_is_an_error_on_the_forward_and_the_server_span(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    model = FakeViT()
    async with traced(fake_engine(fake_served_model(module=model)), tracing) as client:
        model.fail_next = True
        response = await client.post("/v1/classify", content=image_bytes((1, 1, 1)), headers={**PNG, **traceparent()})
        assert response.status_code == 500
    spans = exporter.get_finished_spans()
    assert only(named(spans, "forward")).status.status_code is StatusCode.ERROR
    assert only(named(spans, "queue")).status.status_code is StatusCode.ERROR
    server = only(named(spans, "POST /v1/classify"))
    assert server.status.status_code is StatusCode.ERROR
    assert server.attributes is not None and server.attributes["error.type"] == "500"


async def test_a_trace_the_caller_did_not_sample_is_not_recorded(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    async with traced(fake_engine(), tracing) as client:
        headers = {**PNG, **traceparent(sampled=False)}
        assert (await client.post("/v1/classify", content=image_bytes((3, 2, 1)), headers=headers)).status_code == 200
    assert exporter.get_finished_spans() == ()  # nor a forward span linked to nothing


async def test_the_access_line_names_the_trace(
    tracing: Tracing, exporter: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    async with traced(fake_engine(), tracing) as client:
        with caplog.at_level("INFO", logger="app.access"):
            await client.post("/v1/classify", content=image_bytes((5, 5, 5)), headers={**PNG, **traceparent()})
    (line,) = [r for r in caplog.records if r.name == "app.access"]
    assert line.fields["trace_id"] == CALLER_TRACE  # type: ignore[attr-defined]


def test_tracing_is_on_as_the_setting_and_the_standard_variables_say() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    assert not wanted("auto", {})
    assert wanted("auto", endpoint)
    assert wanted("auto", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert wanted("auto", {"OTEL_TRACES_EXPORTER": "console"})
    assert not wanted("auto", {**endpoint, "OTEL_SDK_DISABLED": "true"})
    assert not wanted("off", endpoint)
    assert wanted("on", {})
    assert start_tracing(Settings(tracing="off"), endpoint) is None


def test_the_exporters_are_the_ones_the_standard_variables_name() -> None:
    def kinds(environ: dict[str, str]) -> list[str]:
        found = exporters(environ)
        for exporter in found:
            exporter.shutdown()
        return [f"{type(e).__module__.rsplit('.', 1)[0]}.{type(e).__name__}" for e in found]

    assert kinds({}) == ["opentelemetry.exporter.otlp.proto.grpc.OTLPSpanExporter"]
    http = ["opentelemetry.exporter.otlp.proto.http.OTLPSpanExporter"]
    assert kinds({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) == http
    assert kinds({"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}) == http
    assert kinds({"OTEL_TRACES_EXPORTER": "none"}) == []
    assert kinds({"OTEL_TRACES_EXPORTER": "console,otlp"}) == [
        "opentelemetry.sdk.trace.ConsoleSpanExporter",
        "opentelemetry.exporter.otlp.proto.grpc.OTLPSpanExporter",
    ]
    with pytest.raises(ModelLoadError, match="http/json"):
        exporters({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"})
    with pytest.raises(ModelLoadError, match="zipkin"):
        exporters({"OTEL_TRACES_EXPORTER": "zipkin"})


def test_tracing_on_without_the_otel_extra_fails_at_start_with_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "app.observability.tracing")
    for name in [name for name in sys.modules if name.startswith("opentelemetry.sdk")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed: importing it raises ImportError
    with pytest.raises(ModelLoadError, match=r"pip install 'vit-serve\[otel\]'"):
        start_tracing(Settings(tracing="on"), {})
    assert start_tracing(Settings(tracing="auto"), {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}) is None


@pytest.mark.slow
def test_tracing_off_loads_no_opentelemetry_sdk() -> None:
    """Off (or auto with nothing set), the service's code path imports none of the otel extra. (FastAPI itself
    imports the OpenTelemetry API, so that much is loaded whatever the setting.)"""
    script = """
import asyncio, sys
import httpx
from app.config.settings import Settings
from app.http.app import create_app
from app.serve.tracing import start_tracing
from tests.support.fakes import fake_engine, image_bytes

async def main():
    settings = Settings(tracing="auto", drain_timeout_s=5)
    app = create_app(settings, fake_engine(), tracing=start_tracing(settings, {}))
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        await app.state.warming
        r = await c.post("/v1/classify", content=image_bytes((1, 2, 3)), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text

asyncio.run(main())
extra = ("opentelemetry.sdk", "opentelemetry.exporter", "app.observability.tracing")
loaded = sorted(m for m in sys.modules if m.startswith(extra))
assert not loaded, loaded
"""
    env = {name: value for name, value in os.environ.items() if not name.startswith("OTEL_")}
    root = Path(__file__).parents[2]
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr


# -- a real server process, exporting over OTLP to a receiver in the test -----------------------------------------


class Received:
    """What an OTLP receiver got: every span, by trace id (hex), and an event set once `wanted` spans of `trace`
    have all arrived."""

    def __init__(self, trace_id: str, wanted: set[str]) -> None:
        self.trace_id = trace_id
        self.wanted = wanted
        self.spans: list[Any] = []
        self.service_names: set[str] = set()
        self.complete = threading.Event()
        self._lock = threading.Lock()

    def add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            for resource_spans in request.resource_spans:
                for attribute in resource_spans.resource.attributes:
                    if attribute.key == "service.name":
                        self.service_names.add(attribute.value.string_value)
                for scope_spans in resource_spans.scope_spans:
                    self.spans.extend(scope_spans.spans)
            if self.wanted <= {span.name for span in self.in_trace()} and self.linked_forward() is not None:
                self.complete.set()

    def in_trace(self) -> list[Any]:
        return [span for span in self.spans if span.trace_id.hex() == self.trace_id]

    def linked_forward(self) -> Any:
        """The forward span linked to the trace, if it has come."""
        return next(
            (s for s in self.spans if s.name == "forward" and any(k.trace_id.hex() == self.trace_id for k in s.links)),
            None,
        )


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    def Export(  # the protocol's name
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.received.add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


@contextmanager
def grpc_receiver(received: Received) -> Iterator[str]:
    """An OTLP/gRPC trace receiver on a free port; its endpoint."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    add_servicer = trace_service_pb2_grpc.add_TraceServiceServicer_to_server  # generated, unannotated
    add_servicer(_TraceService(received), server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


@contextmanager
def http_receiver(received: Received) -> Iterator[str]:
    """An OTLP/HTTP (protobuf) trace receiver on a free port; its endpoint (the exporter adds /v1/traces)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # http.server's name
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.path == "/v1/traces":
                received.add(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200 if self.path == "/v1/traces" else 404)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_a_server_process_exports_the_trace_over_otlp(tmp_path: Path, protocol: str) -> None:
    received = Received(CALLER_TRACE, {"POST /v1/classify", "preprocess", "queue"})
    receiver = grpc_receiver if protocol == "grpc" else http_receiver
    with receiver(received) as endpoint:
        write_tiny_model(tmp_path)
        port = free_port()
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_PROTOCOL": protocol,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "OTEL_SERVICE_NAME": "vit-serve-under-test",
        }
        args = ["--model-repository", str(tmp_path), "--model", "tiny", "--port", str(port)]
        server = start(args, cwd=tmp_path, env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(server, url)
            response = httpx.post(
                f"{url}/v1/classify", content=image_bytes((200, 10, 10)), headers={**PNG, **traceparent()}, timeout=60
            )
            assert response.status_code == 200
            assert received.complete.wait(timeout=60), [span.name for span in received.spans]
        finally:
            stop(server)
    server_span = next(span for span in received.in_trace() if span.name == "POST /v1/classify")
    assert server_span.parent_span_id.hex() == CALLER_SPAN
    assert [link.span_id for link in received.linked_forward().links] == [server_span.span_id]
    assert received.service_names == {"vit-serve-under-test"}
    assert not any(span.name.startswith("GET /readyz") for span in received.spans)  # the readiness polls
