"""The Open Inference Protocol over gRPC, in-process: a real grpc.aio server (servicer and interceptors) beside the real
HTTP app, over one tiny engine, called through our own generated stub. (Never tritonclient.grpc in this process: its
generated modules define the same `inference.*` messages as ours.)"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
from google.protobuf import json_format
from pydantic import SecretStr

from app.config.settings import BatchingConfig, Settings
from app.engine.descriptions import Agreement, BatchRecord, ModelInfo
from app.engine.facade import Engine
from app.grpc.interceptors import interceptors
from app.grpc.proto import inference_pb2 as pb
from app.grpc.proto import inference_pb2_grpc
from app.grpc.servicer import InferenceServicer
from app.observability.metrics import Metrics
from app.pipeline.image_scan import ImageLimits
from app.protocols.oip.tensors import pack_bytes, unpack_bytes
from tests.support.fakes import (
    FAKE_CLASSES,
    FakeViT,
    distinct_colors,
    fake_engine,
    fake_served_model,
    image_bytes,
    prepared_on_cpu,
    tiny_vit,
    write_model_folder,
)
from tests.support.inprocess import serve_in_process
from tests.support.photos import photo_jpegs
from tests.support.waiting import wait_until

Stub = inference_pb2_grpc.GRPCInferenceServiceStub
INFER = "/inference.GRPCInferenceService/ModelInfer"
KEYS = "old-key-0123456789,new-key-9876543210"
RED = image_bytes((255, 0, 0))
PNGS = [image_bytes(c) for c in distinct_colors(3)]


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    photos = photo_jpegs()
    return [photos[name] for name in ("chelsea", "astronaut", "coffee")]


@asynccontextmanager
async def served(
    engine: Engine, settings: Settings | None = None
) -> AsyncIterator[tuple[Stub, httpx.AsyncClient, Metrics]]:
    """The real HTTP app and a gRPC server over one engine, in this event loop, sharing the app's metrics."""
    settings = settings or Settings(drain_timeout_s=5)
    async with serve_in_process(engine, settings) as client:
        metrics: Metrics = client._transport.app.state.metrics  # type: ignore[attr-defined]
        server = grpc.aio.server(interceptors=interceptors(settings, metrics))
        servicer = InferenceServicer(engine, settings)
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                yield Stub(channel), client, metrics  # type: ignore[no-untyped-call]
        finally:
            await server.stop(grace=None)


def images_request(
    images: Sequence[bytes], *, model: str = "fake", typed: bool = False, **fields: Any
) -> pb.ModelInferRequest:
    """Encoded images as the BYTES input IMAGE: raw (length-prefixed) or typed (`bytes_contents`)."""
    request = pb.ModelInferRequest(model_name=model, **fields)
    tensor = request.inputs.add(name="IMAGE", datatype="BYTES", shape=[len(images)] if typed else [len(images), 1])
    if typed:
        tensor.contents.bytes_contents.extend(images)
    else:
        request.raw_input_contents.append(pack_bytes(images))
    return request


def logits_of(response: pb.ModelInferResponse) -> np.ndarray:
    (output,) = response.outputs
    assert (output.name, output.datatype) == ("LOGITS", "FP32")
    return np.frombuffer(response.raw_output_contents[0], dtype="<f4").reshape(list(output.shape))


async def rest_logits(client: httpx.AsyncClient, images: Sequence[bytes]) -> np.ndarray:
    """The same images through REST's OIP (JSON, base64)."""
    spec = {"name": "IMAGE", "shape": [len(images)], "datatype": "BYTES"}
    body = {"inputs": [{**spec, "data": [base64.b64encode(i).decode() for i in images]}]}
    response = await client.post("/v2/models/fake/infer", json=body)
    assert response.status_code == 200, response.text
    (output,) = response.json()["outputs"]
    return np.array(output["data"], dtype=np.float32).reshape(output["shape"])


async def infer(stub: Stub, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    """A ModelInfer call as a coroutine, for a task."""
    response: pb.ModelInferResponse = await stub.ModelInfer(request)
    return response


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    return raised.value


def trailing(error: grpc.aio.AioRpcError) -> dict[str, str]:
    return {key: value for key, value in error.trailing_metadata() or () if isinstance(value, str)}


class BatchRecorder:
    """An engine observer that keeps each batch's record."""

    def __init__(self) -> None:
        self.batches: list[BatchRecord] = []

    def image_prepared(self, model: str, seconds: float) -> None: ...
    def batch_split(self, model: str, size: int) -> None: ...
    def model_loaded(self, model: ModelInfo) -> None: ...
    def model_unloaded(self, name: str) -> None: ...
    def accuracy_measured(self, model: str, agreement: Agreement) -> None: ...

    def batch_done(self, model: str, record: BatchRecord) -> None:
        self.batches.append(record)


async def test_probes_and_descriptions_say_what_rest_says() -> None:
    async with served(fake_engine()) as (stub, client, _):
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="fake"))).ready
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="fake_pixels", version="1"))).ready
        server = await stub.ServerMetadata(pb.ServerMetadataRequest())
        assert server == json_format.ParseDict((await client.get("/v2")).json(), pb.ServerMetadataResponse())
        assert list(server.extensions) == ["binary_tensor_data", "classification", "model_configuration"]
        for name in ("fake", "fake_pixels"):
            metadata = await stub.ModelMetadata(pb.ModelMetadataRequest(name=name))
            rest = (await client.get(f"/v2/models/{name}")).json()
            assert metadata == json_format.ParseDict(rest, pb.ModelMetadataResponse())
            config = (await stub.ModelConfig(pb.ModelConfigRequest(name=name, version="1"))).config
            rest = (await client.get(f"/v2/models/{name}/config")).json()
            assert config == json_format.ParseDict(rest, pb.ModelConfig())
        assert config.max_batch_size == 16 and config.input[0].name == "PIXELS"
        assert [(o.name, list(o.shape)) for o in metadata.outputs] == [("LOGITS", [-1, FAKE_CLASSES])]


async def test_jpegs_raw_and_typed_give_rests_logits_and_the_id_back(jpegs: list[bytes]) -> None:
    async with served(fake_engine()) as (stub, client, _):
        expected = await rest_logits(client, jpegs)
        for typed in (False, True):
            response = await stub.ModelInfer(images_request(jpegs, typed=typed, id="req-7"))
            assert (response.id, response.model_name, response.model_version) == ("req-7", "fake", "1")
            assert list(response.outputs[0].shape) == [3, FAKE_CLASSES]
            np.testing.assert_allclose(logits_of(response), expected, atol=1e-6)


async def test_pixels_raw_and_typed_give_the_logits_of_the_same_images(jpegs: list[bytes]) -> None:
    served_model = fake_served_model()
    limits = ImageLimits(max_pixels=10**8)
    pixels = np.stack([prepared_on_cpu(served_model, i, limits).numpy() for i in jpegs])  # what the model is fed
    async with served(fake_engine()) as (stub, client, _):
        expected = await rest_logits(client, jpegs)
        raw = pb.ModelInferRequest(model_name="fake_pixels", raw_input_contents=[pixels.astype("<f4").tobytes()])
        raw.inputs.add(name="PIXELS", datatype="FP32", shape=pixels.shape)
        typed = pb.ModelInferRequest(model_name="fake_pixels")
        typed.inputs.add(name="PIXELS", datatype="FP32", shape=pixels.shape).contents.fp32_contents.extend(
            pixels.ravel().tolist()
        )
        for request in (raw, typed):
            response = await stub.ModelInfer(request)
            assert response.model_name == "fake_pixels"
            np.testing.assert_allclose(logits_of(response), expected, atol=1e-5)


async def test_classification_gives_value_index_label_strings_as_rest_does() -> None:
    async with served(fake_engine()) as (stub, client, _):
        request = images_request(PNGS)
        request.outputs.add(name="LOGITS").parameters["classification"].int64_param = 3
        response = await stub.ModelInfer(request)
        (output,) = response.outputs
        assert (output.datatype, list(output.shape)) == ("BYTES", [3, 3])
        strings = [s.decode() for s in unpack_bytes(response.raw_output_contents[0], "LOGITS")]
        spec = {"name": "IMAGE", "shape": [3], "datatype": "BYTES"}
        body = {
            "inputs": [{**spec, "data": [base64.b64encode(i).decode() for i in PNGS]}],
            "outputs": [{"name": "LOGITS", "parameters": {"classification": 3}}],
        }
        rest = (await client.post("/v2/models/fake/infer", json=body)).json()
    assert strings == rest["outputs"][0]["data"]
    assert all(len(s.split(":")) == 3 and s.split(":")[2].startswith("class") for s in strings)


async def test_a_grpc_and_an_http_request_share_one_batch() -> None:
    model = FakeViT()
    batching = BatchingConfig(max_batch_size=2, max_queue_delay_ms=0, max_queue_size=16)
    engine = fake_engine(fake_served_model(module=model, batching=batching))
    recorder = BatchRecorder()
    async with served(engine) as (stub, client, _):
        expected = await rest_logits(client, PNGS[:2])
        engine.observe(recorder)
        model.hold()  # a first request holds the model: the next two wait in its queue together
        holder = asyncio.create_task(infer(stub, images_request([RED])))
        await model.wait_until_in_forward()
        over_grpc = asyncio.create_task(infer(stub, images_request([PNGS[0]])))
        over_http = asyncio.create_task(rest_logits(client, [PNGS[1]]))
        queue = engine.model("fake").batcher
        await wait_until(lambda: queue.queued == 2)
        model.release()
        await holder
        grpc_answer, http_answer = await asyncio.gather(over_grpc, over_http)
    assert [batch.size for batch in recorder.batches] == [1, 2]
    np.testing.assert_allclose(logits_of(grpc_answer)[0], expected[0], atol=1e-6)
    np.testing.assert_allclose(http_answer[0], expected[1], atol=1e-6)


async def test_errors_get_their_codes_and_the_service_goes_on() -> None:
    async with served(fake_engine()) as (stub, _, _):
        corrupt = await refused(stub.ModelInfer(images_request([RED, b"\xff\xd8\xff\xe0 not a jpeg"])))
        assert corrupt.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "image 1" in (corrupt.details() or "")
        assert trailing(corrupt)["vit-error-index"] == "1"
        assert trailing(corrupt)["vit-error-code"] in {"invalid_image", "unsupported_media_type"}
        unknown = await refused(stub.ModelInfer(images_request([RED], model="nope")))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND and trailing(unknown)["vit-error-code"] == "model_not_found"
        assert (await refused(stub.ModelMetadata(pb.ModelMetadataRequest(name="fake", version="2")))).code() == (
            grpc.StatusCode.NOT_FOUND
        )
        too_many = pb.ModelInferRequest(model_name="fake", raw_input_contents=[b""])  # refused before any is read
        too_many.inputs.add(name="IMAGE", datatype="BYTES", shape=[17, 1])
        error = await refused(stub.ModelInfer(too_many))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert trailing(error)["vit-error-code"] == "too_many_images"
        assert "limit is 16" in (error.details() or "")
        bad_timeout = images_request([RED])
        bad_timeout.parameters["timeout"].string_param = "soon"
        error = await refused(stub.ModelInfer(bad_timeout))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert trailing(error)["vit-error-code"] == "invalid_parameter"
        wrong_input = images_request([RED])
        wrong_input.inputs[0].name = "PIXELS"
        assert (await refused(stub.ModelInfer(wrong_input))).code() == grpc.StatusCode.INVALID_ARGUMENT
        short = images_request([RED, RED], typed=True)
        short.inputs[0].shape[:] = [3]  # three declared, two given
        assert (await refused(stub.ModelInfer(short))).code() == grpc.StatusCode.INVALID_ARGUMENT
        index = await refused(stub.RepositoryIndex(pb.RepositoryIndexRequest()))
        assert index.code() == grpc.StatusCode.UNIMPLEMENTED and "model control is off" in (index.details() or "")
        assert logits_of(await stub.ModelInfer(images_request([RED]))).shape == (1, FAKE_CLASSES)


async def test_a_full_queue_is_unavailable_with_retry_metadata_and_a_short_timeout_deadline_exceeded() -> None:
    model = FakeViT()
    batching = BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=1)
    engine = fake_engine(fake_served_model(module=model, batching=batching))
    async with served(engine) as (stub, _, _):
        model.hold()  # one request in the forward, one in the queue: the queue is full
        held = asyncio.create_task(infer(stub, images_request([RED])))
        await model.wait_until_in_forward()
        queued = asyncio.create_task(infer(stub, images_request([RED])))
        await wait_until(lambda: engine.model("fake").batcher.queued == 1)
        full = await refused(stub.ModelInfer(images_request([RED])))
        model.release()
        await asyncio.gather(held, queued)

        model.hold()
        held = asyncio.create_task(infer(stub, images_request([RED])))
        await model.wait_until_in_forward()
        short = images_request([RED])
        short.parameters["timeout"].int64_param = 50_000  # 50 ms, queued behind the held one
        timed_out = await refused(stub.ModelInfer(short))
        model.release()
        await held
        assert logits_of(await stub.ModelInfer(images_request([RED]))).shape == (1, FAKE_CLASSES)
    assert timed_out.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert trailing(timed_out)["vit-error-code"] == "deadline_exceeded"
    assert full.code() == grpc.StatusCode.UNAVAILABLE
    retry = {"vit-error-code": "queue_full", "retry-after": "1", "grpc-retry-pushback-ms": "1000"}
    assert trailing(full).items() >= retry.items()


async def test_api_keys_guard_every_call_but_the_probes() -> None:
    settings = Settings(drain_timeout_s=5, api_keys=KEYS)
    async with served(fake_engine(), settings) as (stub, _, metrics):
        for metadata in [(), (("authorization", "Bearer wrong-key"),), (("authorization", "Basic bmV3LWtleQ=="),)]:
            error = await refused(stub.ModelInfer(images_request([RED]), metadata=metadata))
            assert error.code() == grpc.StatusCode.UNAUTHENTICATED
            assert trailing(error)["vit-error-code"] == "unauthorized"
        missing = await refused(stub.ServerMetadata(pb.ServerMetadataRequest()))
        assert missing.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer <key>" in (missing.details() or "")
        assert (await stub.ServerLive(pb.ServerLiveRequest())).live
        assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
        no_key = await refused(stub.ModelReady(pb.ModelReadyRequest(name="fake")))  # as /v2/models/fake/ready
        assert no_key.code() == grpc.StatusCode.UNAUTHENTICATED
        for key in KEYS.split(","):
            answer = await stub.ModelInfer(images_request([RED]), metadata=(("authorization", f"bearer {key}"),))
            assert logits_of(answer).shape == (1, FAKE_CLASSES)
        counted = {"model": "", "endpoint": INFER, "code": "UNAUTHENTICATED"}
        assert metrics.registry.get_sample_value("vit_requests_total", counted) == 3


async def test_calls_are_counted_and_logged_with_the_grpc_method_and_status(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="app.access")
    async with served(fake_engine()) as (stub, _, metrics):
        call = stub.ModelInfer(images_request(PNGS[:2]), metadata=(("x-request-id", "grpc-id-7"),))
        await call
        assert ("x-request-id", "grpc-id-7") in tuple(await call.initial_metadata() or ())
        await refused(stub.ModelInfer(images_request([RED], model="nope")))
        await stub.ServerLive(pb.ServerLiveRequest())
        registry = metrics.registry

        def requests(model: str, code: str) -> float | None:
            return registry.get_sample_value("vit_requests_total", {"model": model, "endpoint": INFER, "code": code})

        assert requests("fake", "OK") == 1
        assert requests("", "NOT_FOUND") == 1
        assert registry.get_sample_value("vit_request_duration_seconds_count", {"model": "fake", "endpoint": INFER})
        assert registry.get_sample_value("vit_rejected_total", {"model": "", "reason": "invalid_input"}) == 1
    lines = [(r.levelno, getattr(r, "fields", {})) for r in caplog.records if r.name == "app.access"]
    grpc_lines = [(level, fields) for level, fields in lines if fields.get("method") == "grpc"]
    (level, ok), (_, not_found), (probe_level, probe) = grpc_lines
    assert level == logging.INFO
    assert ok["path"] == INFER and ok["status"] == "OK" and ok["request_id"] == "grpc-id-7"
    assert ok["model"] == "fake" and ok["images"] == 2 and {"queue_wait_ms", "inference_ms"} <= set(ok)
    assert not_found["status"] == "NOT_FOUND" and len(not_found["request_id"]) == 32  # made: none was sent
    assert probe["path"].endswith("/ServerLive") and probe_level == logging.DEBUG


async def test_the_repository_calls_load_and_unload_with_model_control(tmp_path: Path) -> None:
    write_model_folder(tmp_path, "first", tiny_vit(seed=1))
    write_model_folder(tmp_path, "third", tiny_vit(seed=3, num_classes=3), labels=["red", "green", "blue"])
    key = "control-key"
    settings = Settings(
        model_repository=tmp_path, model=["first"], model_control=True, api_keys=[SecretStr(key)], drain_timeout_s=5
    )
    auth = (("authorization", f"Bearer {key}"),)
    async with served(Engine.load(settings), settings) as (stub, _, _):
        server = await stub.ServerMetadata(pb.ServerMetadataRequest(), metadata=auth)
        assert "model_repository" in server.extensions
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(), metadata=auth)
        assert [(m.name, m.state, m.reason) for m in index.models] == [
            ("first", "READY", ""),
            ("third", "UNAVAILABLE", "unloaded"),
        ]
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="third"), metadata=auth)
        assert (await stub.ModelReady(pb.ModelReadyRequest(name="third"), metadata=auth)).ready
        ready = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), metadata=auth)
        assert [m.name for m in ready.models] == ["first", "third"]
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="third"), metadata=auth)
        gone = await refused(stub.ModelReady(pb.ModelReadyRequest(name="third"), metadata=auth))
        assert gone.code() == grpc.StatusCode.NOT_FOUND
        default = await refused(
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="first"), metadata=auth)
        )
        assert (
            default.code() == grpc.StatusCode.FAILED_PRECONDITION and trailing(default)["vit-error-code"] == "conflict"
        )
        missing = await refused(
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="nope"), metadata=auth)
        )
        assert missing.code() == grpc.StatusCode.NOT_FOUND
        keyless = await refused(stub.RepositoryIndex(pb.RepositoryIndexRequest()))
        assert keyless.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_a_cancelled_call_is_counted_and_its_image_never_runs() -> None:
    model = FakeViT()
    batching = BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=4)
    engine = fake_engine(fake_served_model(module=model, batching=batching))
    async with served(engine) as (stub, _, metrics):
        model.batch_sizes.clear()
        model.hold()
        held = asyncio.create_task(infer(stub, images_request([RED])))
        await model.wait_until_in_forward()
        call = stub.ModelInfer(images_request([PNGS[0]]))
        await wait_until(lambda: engine.model("fake").batcher.queued == 1)
        call.cancel()
        cancelled = {"model": "fake", "endpoint": INFER, "code": "CANCELLED"}
        await wait_until(lambda: metrics.registry.get_sample_value("vit_requests_total", cancelled) == 1)
        model.release()
        await held
        await infer(stub, images_request([PNGS[1]]))
        assert metrics.registry.get_sample_value("vit_rejected_total", {"model": "fake", "reason": "cancelled"}) == 1
    assert model.batch_sizes == [1, 1]  # the held request's, then the last one's: the cancelled image was dropped


async def test_a_failed_batch_and_an_unexpected_error_are_internal_and_tell_nothing_inside(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    model = FakeViT()
    engine = fake_engine(fake_served_model(module=model))
    async with served(engine) as (stub, _, _):
        model.fail_next = True
        failed = await refused(stub.ModelInfer(images_request([RED])))
        assert failed.code() == grpc.StatusCode.INTERNAL and trailing(failed)["vit-error-code"] == "inference_failed"

        async def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("secret internals")

        monkeypatch.setattr(engine, "infer", broken)
        unexpected = await refused(stub.ModelInfer(images_request([RED])))
        monkeypatch.undo()
        assert unexpected.code() == grpc.StatusCode.INTERNAL
        assert unexpected.details() == "internal server error"
        assert trailing(unexpected)["vit-error-code"] == "internal_error"
        assert logits_of(await stub.ModelInfer(images_request([RED]))).shape == (1, FAKE_CLASSES)
    (logged,) = [r for r in caplog.records if "unhandled error in gRPC ModelInfer" in r.getMessage()]
    assert logged.exc_info is not None and "secret internals" in str(logged.exc_info[1])  # the traceback, logged
