"""The HTTP API in-process, over real ASGI, with a deterministic fake ViT: bodies, answers, batching, errors."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import BaseModel

from app.config.settings import BatchingConfig, Settings
from app.engine.facade import Limits
from app.http.schemas import ClassifyOptions, EmbedOptions, ExplainOptions
from app.pipeline.image_scan import ImageLimits
from tests.support.fakes import (
    FAKE_CLASSES,
    FakeViT,
    distinct_colors,
    fake_engine,
    fake_served_model,
    image_bytes,
    prepared_on_cpu,
    served_model_of,
)
from tests.support.inprocess import ClientFactory, serve_in_process
from tests.support.waiting import wait_until

RED = image_bytes((255, 0, 0))


def _direct(model: FakeViT, tensor: torch.Tensor) -> np.ndarray:
    """What the fake model gives for this preprocessed image when run directly, outside the service."""
    with torch.inference_mode():
        return (tensor[None].mean(dim=(2, 3)) @ model.weight)[0].numpy()


async def post_image(
    client: httpx.AsyncClient, data: bytes, url: str = "/v1/classify", **params: str | int
) -> httpx.Response:
    return await client.post(url, content=data, headers={"Content-Type": "image/png"}, params=params)


# -- answers ------------------------------------------------------------------------------------------------


async def test_raw_image_gets_sorted_top_k_and_logits(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"})
    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "fake"
    (prediction,) = body["predictions"]
    scores = [c["score"] for c in prediction["top_k"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    assert len(prediction["logits"]) == FAKE_CLASSES
    logits = np.array(prediction["logits"])
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    best = prediction["top_k"][0]
    assert best["index"] == int(np.argmax(logits))
    assert best["label"] == f"class{best['index']}"
    assert best["score"] == pytest.approx(probs.max(), rel=1e-5)


async def test_octet_stream_and_missing_content_type_are_raw_images(client: httpx.AsyncClient) -> None:
    for headers in ({"Content-Type": "application/octet-stream"}, {}):
        response = await client.post("/v1/classify", content=RED, headers=headers)
        assert response.status_code == 200, response.text


async def test_multipart_keeps_the_order_of_its_files_whatever_their_names(client: httpx.AsyncClient) -> None:
    colors = distinct_colors(3)
    names = ["z", "a", "y"]
    files = [(names[i], (f"{i}.png", image_bytes(c), "image/png")) for i, c in enumerate(colors)]
    response = await client.post("/v1/classify", files=files, data={"top_k": "2", "logits": "true"})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert [len(p["top_k"]) for p in predictions] == [2, 2, 2]
    singles = [await post_image(client, image_bytes(c)) for c in colors]
    assert [p["logits"] for p in predictions] == [s.json()["predictions"][0]["logits"] for s in singles]


async def test_json_with_base64_and_data_uris(client: httpx.AsyncClient) -> None:
    jpeg = image_bytes((0, 200, 30), fmt="JPEG")
    wrapped = base64.encodebytes(RED).decode()  # line-wrapped, as `base64 file` prints it
    images = [base64.b64encode(jpeg).decode(), f"data:image/jpeg;base64,{base64.b64encode(jpeg).decode()}", wrapped]
    response = await client.post("/v1/classify", json={"images": images, "top_k": 3, "logits": False})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 3
    assert all("logits" not in p and len(p["top_k"]) == 3 for p in predictions)
    assert predictions[0] == predictions[1] != predictions[2]


async def test_query_options_apply_and_a_json_body_overrides_them(client: httpx.AsyncClient) -> None:
    response = await post_image(client, RED, top_k=1, logits="false")
    assert response.json()["predictions"][0] == {"top_k": response.json()["predictions"][0]["top_k"]}
    assert len(response.json()["predictions"][0]["top_k"]) == 1
    body = {"images": [base64.b64encode(RED).decode()], "top_k": 4}
    response = await client.post("/v1/classify", json=body, params={"top_k": 1})
    assert len(response.json()["predictions"][0]["top_k"]) == 4


async def test_a_bad_query_option_is_refused_whatever_the_body_says(client: httpx.AsyncClient) -> None:
    body = {"images": [base64.b64encode(RED).decode()], "top_k": 2}
    for content in ({"json": body}, {"content": b"text", "headers": {"Content-Type": "text/plain"}}):
        response = await client.post("/v1/classify", params={"top_k": 0}, **content)
        assert response.status_code == 422
        assert response.json() == {
            "error": "query top_k: Input should be greater than or equal to 1",
            "code": "invalid_parameter",
        }


async def test_named_model_route_and_several_models() -> None:
    engine = fake_engine(fake_served_model("a"), fake_served_model("b", module=FakeViT(num_classes=3)))
    async with serve_in_process(engine) as client:
        default = await post_image(client, RED)
        named = await post_image(client, RED, url="/v1/models/b/classify")
        assert default.json()["model"] == "a" and len(default.json()["predictions"][0]["logits"]) == FAKE_CLASSES
        assert named.json()["model"] == "b" and len(named.json()["predictions"][0]["logits"]) == 3
        models = (await client.get("/v1/models")).json()
        assert models["default"] == "a"
        assert [m["name"] for m in models["models"]] == ["a", "b"]
        info = (await client.get("/v1/models/b")).json()
        assert info["num_classes"] == 3 and info["ready"] is True and info["input_size"] == [3, 32, 32]
        assert info["batching"] == {
            "max_batch_size": 8,
            "max_queue_delay_ms": 2.0,
            "max_queue_size": 64,
            "max_queue_bytes": 64 * 2**20,
        }


# -- batching -----------------------------------------------------------------------------------------------


async def test_concurrent_requests_are_batched_together_and_each_gets_its_own_answer(serve: ClientFactory) -> None:
    model = FakeViT()
    batching = BatchingConfig(max_batch_size=6, max_queue_delay_ms=0, max_queue_size=64)
    async with serve(fake_engine(fake_served_model(module=model, batching=batching))) as client:
        model.batch_sizes.clear()  # forget the warm-up
        model.hold()
        # One request occupies the model; six more arrive meanwhile, three of them as one 2-image request.
        first = asyncio.create_task(post_image(client, RED))
        await model.wait_until_in_forward()
        colors = distinct_colors(7)
        singles = [asyncio.create_task(post_image(client, image_bytes(c))) for c in colors[:4]]
        pair_files = [("f", (f"{i}.png", image_bytes(c), "image/png")) for i, c in enumerate(colors[4:6])]
        pair = asyncio.create_task(client.post("/v1/classify", files=pair_files))
        engine_model = served_model_of(client)
        await wait_until(lambda: engine_model.batcher.queued == 6)
        model.release()
        responses = await asyncio.gather(first, *singles, pair)
    assert [r.status_code for r in responses] == [200] * 6
    # The first batch held one image; the other six waited and went through as ONE batch.
    assert model.batch_sizes == [1, 6]
    answers = [r.json()["predictions"][0]["logits"] for r in responses[1:5]]
    answers += [p["logits"] for p in responses[5].json()["predictions"]]
    for color, answer in zip(colors[:6], answers, strict=True):
        np.testing.assert_allclose(answer, _direct_for(model, image_bytes(color)), atol=1e-5)


async def test_requests_arriving_together_at_an_idle_model_share_one_batch(serve: ClientFactory) -> None:
    model = FakeViT()
    # A window far longer than the test: only a full batch (the size trigger) can answer these in time.
    batching = BatchingConfig(max_batch_size=4, max_queue_delay_ms=600_000, max_queue_size=64)
    async with serve(fake_engine(fake_served_model(module=model, batching=batching))) as client:
        model.batch_sizes.clear()
        colors = distinct_colors(4)
        async with asyncio.timeout(20):
            responses = await asyncio.gather(*(post_image(client, image_bytes(c)) for c in colors))
    assert model.batch_sizes == [4]
    for color, response in zip(colors, responses, strict=True):
        np.testing.assert_allclose(
            response.json()["predictions"][0]["logits"], _direct_for(model, image_bytes(color)), atol=1e-5
        )


def _direct_for(model: FakeViT, data: bytes) -> np.ndarray:
    served = fake_served_model(module=model)
    return _direct(model, prepared_on_cpu(served, data, ImageLimits(max_pixels=10**8)))


# -- errors, each followed by a good request to prove nothing else broke ------------------------------------


def _truncated_jpeg() -> bytes:
    data = image_bytes((10, 20, 30), size=(64, 64), fmt="JPEG")
    return data[: len(data) // 2]


BAD_REQUESTS = [
    pytest.param({"content": b"", "headers": {"Content-Type": "image/png"}}, 400, "empty_image", id="empty-body"),
    pytest.param(
        {"content": b"<html>hi</html>", "headers": {"Content-Type": "image/jpeg"}},
        415,
        "unsupported_image_format",
        id="html-as-jpeg",
    ),
    pytest.param(
        {"content": _truncated_jpeg(), "headers": {"Content-Type": "image/jpeg"}}, 400, "invalid_image", id="truncated"
    ),
    pytest.param(
        {"content": RED, "headers": {"Content-Type": "text/plain"}}, 415, "unsupported_content_type", id="text-plain"
    ),
    pytest.param({"json": [1, 2]}, 422, "invalid_body", id="json-not-object"),
    pytest.param({"json": {"images": "abc"}}, 422, "invalid_body", id="images-not-list"),
    pytest.param({"json": {"images": ["%%%"]}}, 400, "invalid_base64", id="bad-base64"),
    pytest.param(
        {"json": {"images": ["data:text/plain;base64,aGVsbG8="]}}, 415, "unsupported_content_type", id="data-uri-text"
    ),
    pytest.param({"json": {"images": [], "top_k": 1}}, 400, "no_image", id="no-images"),
    pytest.param({"json": {"images": ["aGk="], "colour": 1}}, 422, "invalid_body", id="unknown-json-key"),
    pytest.param(
        {"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "invalid_json", id="bad-json"
    ),
    pytest.param(
        {"content": RED, "headers": {"Content-Type": "image/png"}, "params": {"top_k": 0}},
        422,
        "invalid_parameter",
        id="top-k-zero",
    ),
    pytest.param(
        {"content": RED, "headers": {"Content-Type": "image/png"}, "params": {"top_k": FAKE_CLASSES + 1}},
        422,
        "invalid_parameter",
        id="top-k-over-classes",
    ),
    pytest.param(
        {"content": RED, "headers": {"Content-Type": "image/png"}, "params": {"top_k": "many"}},
        422,
        "invalid_parameter",
        id="top-k-not-int",
    ),
    pytest.param(
        {"files": [("a", ("a.png", RED, "image/png"))], "data": {"colour": "red"}},
        422,
        "invalid_parameter",
        id="unknown-form-field",
    ),
    pytest.param(
        {"content": b"--x\r\nbroken", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
        400,
        "invalid_multipart",
        id="unterminated-multipart",
    ),
    pytest.param(
        {"content": b"abc", "headers": {"Content-Type": "multipart/form-data"}},
        400,
        "invalid_multipart",
        id="multipart-without-boundary",
    ),
]


@pytest.mark.parametrize(("request_kwargs", "status", "code"), BAD_REQUESTS)
async def test_bad_input_gets_a_clear_json_error_and_the_service_still_serves(
    client: httpx.AsyncClient, request_kwargs: dict[str, object], status: int, code: str
) -> None:
    response = await client.post("/v1/classify", **request_kwargs)  # type: ignore[arg-type]
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    assert body["error"] and "Traceback" not in body["error"]
    assert (await post_image(client, RED)).status_code == 200


async def test_the_offending_image_is_named_by_index(client: httpx.AsyncClient) -> None:
    images = [base64.b64encode(RED).decode(), base64.b64encode(_truncated_jpeg()).decode()]
    response = await client.post("/v1/classify", json={"images": images})
    assert response.status_code == 400
    assert response.json()["index"] == 1


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    response = await post_image(client, RED, url="/v1/models/nope/classify")
    assert response.status_code == 404
    assert response.json()["code"] == "model_not_found"
    assert (await client.get("/v1/models/nope")).status_code == 404


async def test_unknown_path_and_method_use_the_error_shape(client: httpx.AsyncClient) -> None:
    assert (await client.get("/nope")).json() == {"error": "Not Found", "code": "not_found"}
    response = await client.get("/v1/classify")
    assert response.status_code == 405 and response.json()["code"] == "method_not_allowed"


async def test_limits_on_body_images_and_pixels(serve: ClientFactory) -> None:
    settings = Settings(max_body_bytes=20_000)
    limits = Limits(max_images_per_request=2, request_timeout_s=30, image=ImageLimits(max_pixels=100 * 100))
    async with serve(fake_engine(limits=limits), settings) as client:
        big = image_bytes((1, 2, 3), size=(101, 100))
        response = await post_image(client, big)
        assert (response.status_code, response.json()["code"]) == (413, "image_too_large")

        files = [("f", (f"{i}.png", RED, "image/png")) for i in range(3)]
        response = await client.post("/v1/classify", files=files)
        assert (response.status_code, response.json()["code"]) == (413, "too_many_images")
        response = await client.post("/v1/classify", json={"images": [base64.b64encode(RED).decode()] * 3})
        assert (response.status_code, response.json()["code"]) == (413, "too_many_images")

        noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (100, 100, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        noise.save(buffer, format="PNG")
        assert len(buffer.getvalue()) > 20_000
        response = await post_image(client, buffer.getvalue())  # Content-Length says it all
        assert (response.status_code, response.json()["code"]) == (413, "body_too_large")

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(30):
                yield b"x" * 1000

        response = await client.post("/v1/classify", content=chunks(), headers={"Content-Type": "image/png"})
        assert (response.status_code, response.json()["code"]) == (413, "body_too_large")
        assert (await post_image(client, RED)).status_code == 200


# -- load, time and faults ------------------------------------------------------------------------------------


async def test_a_full_queue_answers_503_with_retry_after_at_once(serve: ClientFactory) -> None:
    model = FakeViT()
    batching = BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=2)
    async with serve(fake_engine(fake_served_model(module=model, batching=batching))) as client:
        model.hold()
        running = asyncio.create_task(post_image(client, RED))
        await model.wait_until_in_forward()
        queued = [asyncio.create_task(post_image(client, RED)) for _ in range(2)]
        served = served_model_of(client)
        await wait_until(lambda: served.batcher.depth == 2)
        response = await post_image(client, RED)
        assert response.status_code == 503
        assert response.json()["code"] == "queue_full"
        assert response.headers["Retry-After"] == "1"
        model.release()
        assert [r.status_code for r in await asyncio.gather(running, *queued)] == [200, 200, 200]


async def test_a_request_past_its_deadline_gets_504_and_its_image_is_never_computed(serve: ClientFactory) -> None:
    model = FakeViT()
    limits = Limits(max_images_per_request=4, request_timeout_s=0.2, image=ImageLimits(max_pixels=10**6))
    batching = BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=8)
    async with serve(fake_engine(fake_served_model(module=model, batching=batching), limits=limits)) as client:
        model.batch_sizes.clear()
        model.hold()
        first = asyncio.create_task(post_image(client, RED))
        await model.wait_until_in_forward()
        late = await post_image(client, image_bytes((0, 0, 255)))  # waits behind the held forward
        assert late.status_code == 504
        assert late.json()["code"] == "deadline_exceeded"
        model.release()
        assert (await first).status_code == 504  # it too ran out of time while held
        assert (await post_image(client, RED)).status_code == 200
    assert model.batch_sizes == [1, 1]  # the held one and the last one; the late image was dropped


async def test_a_failing_forward_is_500_for_its_batch_only_and_the_service_goes_on(serve: ClientFactory) -> None:
    model = FakeViT()
    async with serve(fake_engine(fake_served_model(module=model))) as client:
        model.fail_next = True
        response = await post_image(client, RED)
        assert response.status_code == 500
        assert response.json() == {"error": "inference failed for this request's batch", "code": "inference_failed"}
        assert (await post_image(client, RED)).status_code == 200
        assert (await client.get("/readyz")).status_code == 200


async def test_out_of_memory_retries_the_batch_in_halves_and_every_request_gets_its_own_answer(
    serve: ClientFactory,
) -> None:
    model = FakeViT()
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_ms=600_000, max_queue_size=64)
    async with serve(fake_engine(fake_served_model(module=model, batching=batching))) as client:
        model.batch_sizes.clear()
        model.oom_above = 2  # as if the device held only two images' activations
        colors = distinct_colors(8)
        responses = await asyncio.gather(*(post_image(client, image_bytes(c)) for c in colors))
        assert [r.status_code for r in responses] == [200] * 8
        for color, response in zip(colors, responses, strict=True):
            np.testing.assert_allclose(
                response.json()["predictions"][0]["logits"], _direct_for(model, image_bytes(color)), atol=1e-5
            )
        assert model.batch_sizes == [8, 4, 2, 2, 4, 2, 2]  # 8 fails, each 4 fails, the 2s run
        metrics = (await client.get("/metrics")).text
        assert 'vit_oom_splits_total{model="fake"} 3.0' in metrics
        assert (await client.get("/readyz")).status_code == 200


async def test_out_of_memory_on_a_single_image_fails_that_request_only(serve: ClientFactory) -> None:
    model = FakeViT()
    async with serve(fake_engine(fake_served_model(module=model))) as client:
        model.oom_above = 0
        response = await post_image(client, RED)
        assert (response.status_code, response.json()["code"]) == (500, "inference_failed")
        model.oom_above = None
        assert (await post_image(client, RED)).status_code == 200
        assert (await client.get("/readyz")).status_code == 200


# -- probes and docs ----------------------------------------------------------------------------------------


async def test_probes_live_is_not_ready(serve: ClientFactory) -> None:
    engine = fake_engine()
    async with serve(engine) as client:
        assert (await client.get("/healthz")).json() == {"status": "alive"}
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and ready.json() == {"ready": True, "models": {"fake": True}}
        await engine.stop(1)  # as on shutdown: still alive, no longer ready
        assert (await client.get("/healthz")).status_code == 200
        not_ready = await client.get("/readyz")
        assert not_ready.status_code == 503
        assert not_ready.json()["models"] == {"fake": False}
        response = await post_image(client, RED)
        assert (response.status_code, response.json()["code"]) == (503, "not_ready")


async def test_openapi_documents_the_real_request_bodies(client: httpx.AsyncClient) -> None:
    spec = (await client.get("/openapi.json")).json()
    body = spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]
    assert {"image/*", "application/octet-stream", "multipart/form-data", "application/json"} <= set(body)
    assert "images" in body["application/json"]["schema"]["properties"]
    assert (await client.get("/docs")).status_code == 200


@pytest.mark.parametrize("options", [ClassifyOptions, EmbedOptions, ExplainOptions])
async def test_image_endpoints_document_their_options_as_query_parameters(
    client: httpx.AsyncClient, options: type[BaseModel]
) -> None:
    """The options model is the one declaration: each field is a documented query parameter and nothing else is."""
    spec = (await client.get("/openapi.json")).json()
    kind = options.__name__.removesuffix("Options").lower()
    paths = sorted(path for path in spec["paths"] if path.endswith("/" + kind))
    assert paths == [f"/v1/{kind}", f"/v1/models/{{name}}/{kind}"]
    for path in paths:
        parameters = spec["paths"][path]["post"]["parameters"]
        query = {p["name"]: p for p in parameters if p["in"] == "query"}
        assert list(query) == list(options.model_fields), path
        assert len(query) == len([p for p in parameters if p["in"] == "query"])  # each once
        for name, field in options.model_fields.items():
            assert query[name]["required"] is False
            assert query[name]["description"] == field.description
            assert "null" not in str(query[name]["schema"])  # a query string cannot say null
    query = {p["name"]: p["schema"] for p in spec["paths"][f"/v1/{kind}"]["post"]["parameters"]}
    if "top_k" in query:
        assert (query["top_k"]["type"], query["top_k"]["minimum"]) == ("integer", 1)
    if "encoding_format" in query:
        assert query["encoding_format"]["enum"] == ["float", "base64"]


async def test_every_reference_in_the_openapi_document_resolves(client: httpx.AsyncClient) -> None:
    """API tools follow each `$ref` from the document's root: one that points nowhere breaks them."""
    spec = (await client.get("/openapi.json")).json()
    references: list[str] = []

    def collect(node: object) -> None:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if isinstance(reference, str):
                references.append(reference)
            for value in node.values():
                collect(value)
        elif isinstance(node, list):
            for item in node:
                collect(item)

    collect(spec)
    assert references  # the document does use references
    for reference in set(references):
        assert reference.startswith("#/"), reference
        target: object = spec
        for part in reference.removeprefix("#/").split("/"):
            assert isinstance(target, dict) and part in target, f"{reference} does not resolve"
            target = target[part]


async def test_a_client_that_disconnects_has_its_queued_image_dropped(serve: ClientFactory) -> None:
    """Raw ASGI, so the disconnect is real: the body arrives, then `http.disconnect` while the image is queued."""
    model = FakeViT()
    batching = BatchingConfig(max_batch_size=4, max_queue_delay_ms=0, max_queue_size=8)
    async with serve(fake_engine(fake_served_model(module=model, batching=batching))) as client:
        app = client._transport.app  # type: ignore[attr-defined]
        served = app.state.engine.model()
        model.batch_sizes.clear()
        model.hold()
        held = asyncio.create_task(post_image(client, RED))
        await model.wait_until_in_forward()

        gone = asyncio.Event()
        messages = [{"type": "http.request", "body": image_bytes((0, 0, 255)), "more_body": False}]
        sent: list[dict[str, object]] = []

        async def receive() -> dict[str, object]:
            if messages:
                return messages.pop(0)
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "path": "/v1/classify",
            "raw_path": b"/v1/classify",
            "query_string": b"",
            "root_path": "",
            "headers": [(b"content-type", b"image/png"), (b"host", b"test")],
            "client": ("127.0.0.1", 1),
            "server": ("test", 80),
        }
        call = asyncio.create_task(app(scope, receive, send))
        await wait_until(lambda: served.batcher.queued == 1)
        gone.set()
        await asyncio.wait_for(call, 10)
        model.release()
        assert (await held).status_code == 200
        assert (await post_image(client, RED)).status_code == 200
    assert sent[0]["status"] == 499
    assert model.batch_sizes == [1, 1]  # the held image and the last one: the abandoned image never ran
    assert served.batcher.stats.skipped_cancelled == 1
