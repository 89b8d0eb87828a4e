"""The Open Inference Protocol in-process: metadata, config, JSON and binary tensors, classification, errors."""

from __future__ import annotations

import base64
import struct
from collections.abc import Mapping
from typing import Any

import httpx
import numpy as np
import orjson
import pytest

from app.pipeline.image_scan import ImageLimits
from app.protocols.oip.tensors import pack_bytes, unpack_bytes
from tests.support.fakes import (
    FAKE_CLASSES,
    FAKE_IMAGE_SIZE,
    FakeViT,
    distinct_colors,
    fake_engine,
    fake_served_model,
    image_bytes,
    prepared_on_cpu,
)
from tests.support.inprocess import ClientFactory

RED = image_bytes((255, 0, 0))
IMAGES = [image_bytes(c) for c in distinct_colors(3)]


def binary_request(header: Mapping[str, object], *chunks: bytes) -> tuple[bytes, dict[str, str]]:
    json_part = orjson.dumps(header)
    return json_part + b"".join(chunks), {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(json_part)),
    }


def split_binary_response(response: httpx.Response) -> tuple[dict[str, Any], bytes]:
    length = int(response.headers["inference-header-content-length"])
    return orjson.loads(response.content[:length]), response.content[length:]


def image_input(images: list[bytes]) -> tuple[dict[str, object], bytes]:
    data = pack_bytes(images)
    spec: dict[str, object] = {
        "name": "IMAGE",
        "shape": [len(images), 1],
        "datatype": "BYTES",
        "parameters": {"binary_data_size": len(data)},
    }
    return spec, data


async def v1_logits(client: httpx.AsyncClient, images: list[bytes]) -> np.ndarray:
    files = [("f", (f"{i}.png", body, "image/png")) for i, body in enumerate(images)]
    response = await client.post("/v1/classify", files=files, params={"top_k": FAKE_CLASSES})
    return np.array([p["logits"] for p in response.json()["predictions"]], dtype=np.float32)


async def test_server_and_model_metadata_config_and_health(client: httpx.AsyncClient) -> None:
    server = (await client.get("/v2")).json()
    assert server["name"] == "vit-serve"
    assert server["extensions"] == ["binary_tensor_data", "classification", "model_configuration"]
    assert (await client.get("/v2/health/live")).status_code == 200
    assert (await client.get("/v2/health/ready")).json() == {"ready": True}
    for path in ("/v2/models/fake", "/v2/models/fake/versions/1"):
        meta = (await client.get(path)).json()
        assert meta["versions"] == ["1"]
        assert meta["inputs"] == [{"name": "IMAGE", "datatype": "BYTES", "shape": [-1, 1]}]
        assert meta["outputs"] == [{"name": "LOGITS", "datatype": "FP32", "shape": [-1, FAKE_CLASSES]}]
        assert (await client.get(f"{path}/ready")).status_code == 200
    pixels = (await client.get("/v2/models/fake_pixels")).json()
    assert pixels["inputs"] == [
        {"name": "PIXELS", "datatype": "FP32", "shape": [-1, 3, FAKE_IMAGE_SIZE, FAKE_IMAGE_SIZE]}
    ]
    config = (await client.get("/v2/models/fake/config")).json()
    assert config["max_batch_size"] == 16  # the per-request image limit
    assert config["input"] == [{"name": "IMAGE", "data_type": "TYPE_STRING", "format": "FORMAT_NONE", "dims": [1]}]
    assert config["output"] == [{"name": "LOGITS", "data_type": "TYPE_FP32", "dims": [FAKE_CLASSES]}]
    assert config["dynamic_batching"] == {"preferred_batch_size": [8], "max_queue_delay_microseconds": 2000}
    pixels_config = (await client.get("/v2/models/fake_pixels/versions/1/config")).json()
    assert pixels_config["input"][0]["dims"] == [3, FAKE_IMAGE_SIZE, FAKE_IMAGE_SIZE]


async def test_binary_images_in_logits_out_equal_v1(client: httpx.AsyncClient) -> None:
    spec, data = image_input(IMAGES)
    header = {"id": "req-7", "inputs": [spec], "outputs": [{"name": "LOGITS", "parameters": {"binary_data": True}}]}
    body, headers = binary_request(header, data)
    response = await client.post("/v2/models/fake/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    meta, payload = split_binary_response(response)
    (output,) = meta["outputs"]
    assert meta["id"] == "req-7" and meta["model_name"] == "fake" and meta["model_version"] == "1"
    assert output == {
        "name": "LOGITS",
        "datatype": "FP32",
        "shape": [3, FAKE_CLASSES],
        "parameters": {"binary_data_size": 3 * FAKE_CLASSES * 4},
    }
    logits = np.frombuffer(payload, dtype="<f4").reshape(3, FAKE_CLASSES)
    np.testing.assert_array_equal(logits, await v1_logits(client, IMAGES))


async def test_json_images_in_json_logits_out(client: httpx.AsyncClient) -> None:
    request = {
        "inputs": [
            {
                "name": "IMAGE",
                "shape": [2],
                "datatype": "BYTES",
                "data": [base64.b64encode(i).decode() for i in IMAGES[:2]],
            }
        ]
    }
    response = await client.post("/v2/models/fake/versions/1/infer", json=request)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    (output,) = response.json()["outputs"]
    assert "parameters" not in output  # the C++ client would then require binary_data_size
    assert output["shape"] == [2, FAKE_CLASSES]
    np.testing.assert_allclose(np.array(output["data"]).reshape(2, -1), await v1_logits(client, IMAGES[:2]), atol=1e-6)


@pytest.mark.parametrize("binary", [True, False])
async def test_classification_extension_gives_value_index_label_best_first(
    client: httpx.AsyncClient, binary: bool
) -> None:
    spec, data = image_input(IMAGES)
    outputs = [{"name": "LOGITS", "parameters": {"classification": 3, "binary_data": binary}}]
    body, headers = binary_request({"inputs": [spec], "outputs": outputs}, data)
    response = await client.post("/v2/models/fake/infer", content=body, headers=headers)
    assert response.status_code == 200, response.text
    if binary:
        meta, payload = split_binary_response(response)
        strings = [s.decode() for s in unpack_bytes(payload, "LOGITS")]
    else:
        meta = response.json()
        strings = meta["outputs"][0]["data"]
    assert meta["outputs"][0]["datatype"] == "BYTES" and meta["outputs"][0]["shape"] == [3, 3]
    v1 = await client.post("/v1/classify", files=[("f", (f"{i}", b, "image/png")) for i, b in enumerate(IMAGES)])
    for row, prediction in zip(np.array(strings).reshape(3, 3), v1.json()["predictions"], strict=True):
        parts = [s.split(":") for s in row]
        assert [int(p[1]) for p in parts] == [c["index"] for c in prediction["top_k"][:3]]
        assert [p[2] for p in parts] == [c["label"] for c in prediction["top_k"][:3]]
        assert [float(p[0]) for p in parts] == pytest.approx(
            [prediction["logits"][c["index"]] for c in prediction["top_k"][:3]], abs=1e-6
        )


async def test_binary_data_output_applies_to_every_output(client: httpx.AsyncClient) -> None:
    spec, data = image_input([RED])
    body, headers = binary_request({"inputs": [spec], "parameters": {"binary_data_output": True}}, data)
    response = await client.post("/v2/models/fake/infer", content=body, headers=headers)
    meta, payload = split_binary_response(response)
    assert meta["outputs"][0]["parameters"] == {"binary_data_size": FAKE_CLASSES * 4}
    assert len(payload) == FAKE_CLASSES * 4


async def test_pixels_model_takes_preprocessed_tensors_binary_and_json(client: httpx.AsyncClient) -> None:
    served = fake_served_model()
    limits = ImageLimits(max_pixels=10**8)
    tensors = np.stack([prepared_on_cpu(served, i, limits).numpy() for i in IMAGES])  # what /v1 would feed the model
    spec = {"name": "PIXELS", "shape": list(tensors.shape), "datatype": "FP32"}
    data = tensors.astype("<f4").tobytes()
    binary_spec = {**spec, "parameters": {"binary_data_size": len(data)}}
    body, headers = binary_request({"inputs": [binary_spec]}, data)
    binary = await client.post("/v2/models/fake_pixels/infer", content=body, headers=headers)
    as_json = await client.post("/v2/models/fake_pixels/infer", json={"inputs": [{**spec, "data": tensors.tolist()}]})
    expected = await v1_logits(client, IMAGES)
    for response in (binary, as_json):
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(np.array(response.json()["outputs"][0]["data"]).reshape(3, -1), expected, atol=1e-5)


async def test_raw_binary_requests_with_a_zero_header_length(client: httpx.AsyncClient) -> None:
    raw = {"Inference-Header-Content-Length": "0", "Content-Type": "application/octet-stream"}
    one = await client.post("/v2/models/fake/infer", content=RED, headers=raw)  # a bare encoded image
    packed = await client.post("/v2/models/fake/infer", content=pack_bytes(IMAGES), headers=raw)
    pixels = np.zeros((2, 3, FAKE_IMAGE_SIZE, FAKE_IMAGE_SIZE), dtype="<f4")
    tensor = await client.post("/v2/models/fake_pixels/infer", content=pixels.tobytes(), headers=raw)
    for response, count in ((one, 1), (packed, 3), (tensor, 2)):
        assert response.status_code == 200, response.text
        meta, payload = split_binary_response(response)  # every output comes back binary
        assert meta["outputs"][0]["shape"] == [count, FAKE_CLASSES]
        assert len(payload) == count * FAKE_CLASSES * 4
    packed_logits = np.frombuffer(split_binary_response(packed)[1], dtype="<f4").reshape(3, -1)
    np.testing.assert_array_equal(packed_logits, await v1_logits(client, IMAGES))


async def test_timeout_and_priority_parameters(serve: ClientFactory) -> None:
    model = FakeViT()
    async with serve(fake_engine(fake_served_model(module=model))) as client:
        spec, data = image_input([RED])
        body, headers = binary_request({"inputs": [spec], "parameters": {"priority": 1, "timeout": 0}}, data)
        assert (await client.post("/v2/models/fake/infer", content=body, headers=headers)).status_code == 200
        model.hold()
        body, headers = binary_request({"inputs": [spec], "parameters": {"timeout": 50_000}}, data)  # 50 ms
        response = await client.post("/v2/models/fake/infer", content=body, headers=headers)
        model.release()
        assert response.status_code == 504 and set(response.json()) >= {"error"}


def _spec(**changes: object) -> dict[str, object]:
    return {"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "data": [base64.b64encode(RED).decode()], **changes}


BAD = [
    pytest.param("/v2/models/nope/infer", {"inputs": [_spec()]}, None, 404, id="unknown-model"),
    pytest.param("/v2/models/fake/versions/2/infer", {"inputs": [_spec()]}, None, 404, id="unknown-version"),
    pytest.param("/v2/models/fake/infer", {"inputs": [_spec(name="INPUT0")]}, None, 400, id="unknown-input"),
    pytest.param("/v2/models/fake/infer", {"inputs": [_spec(datatype="FP32")]}, None, 400, id="wrong-datatype"),
    pytest.param("/v2/models/fake/infer", {"inputs": [_spec(shape=[2, 1])]}, None, 400, id="shape-vs-data"),
    pytest.param("/v2/models/fake/infer", {"inputs": [_spec(data=["%%"])]}, None, 400, id="bad-base64"),
    pytest.param("/v2/models/fake/infer", {"inputs": []}, None, 422, id="no-inputs"),
    pytest.param("/v2/models/fake/infer", {"inputs": [_spec()], "outputs": [{"name": "PROBS"}]}, None, 400, id="out"),
    pytest.param(
        "/v2/models/fake/infer",
        {"inputs": [_spec()], "outputs": [{"name": "LOGITS", "parameters": {"classification": 0}}]},
        None,
        422,
        id="classification-0",
    ),
    pytest.param("/v2/models/fake/infer", {"inputs": [_spec()], "parameters": {"timeout": "x"}}, None, 422, id="to"),
    pytest.param(
        "/v2/models/fake_pixels/infer",
        {"inputs": [{"name": "PIXELS", "shape": [1, 3, 8, 8], "datatype": "FP32", "data": [0.0] * 192}]},
        None,
        400,
        id="pixels-wrong-size",
    ),
    pytest.param("/v2/models/fake/infer", None, b"{nope", 400, id="bad-json"),
    pytest.param("/v2/models/fake/infer", None, b'{"inputs": 3}', 422, id="inputs-not-list"),
]


@pytest.mark.parametrize(("path", "request_json", "raw", "status"), BAD)
async def test_bad_requests_get_json_errors_and_the_service_goes_on(
    client: httpx.AsyncClient, path: str, request_json: object, raw: bytes | None, status: int
) -> None:
    if raw is not None:
        response = await client.post(path, content=raw, headers={"Content-Type": "application/json"})
    else:
        response = await client.post(path, json=request_json)
    assert response.status_code == status, response.text
    assert isinstance(response.json()["error"], str)
    assert (await client.post("/v2/models/fake/infer", json={"inputs": [_spec()]})).status_code == 200


JSON_ONLY = orjson.dumps({"inputs": [_spec()]})


@pytest.mark.parametrize(
    ("header_length", "body"),
    [
        pytest.param("abc", b"{}", id="not-a-number"),
        pytest.param("9999", b"{}", id="longer-than-body"),
        pytest.param(str(len(JSON_ONLY)), JSON_ONLY + b"\x05\x00\x00\x00ab", id="binary-not-claimed"),
    ],
)
async def test_broken_binary_framing_is_400(client: httpx.AsyncClient, header_length: str, body: bytes) -> None:
    headers = {"Inference-Header-Content-Length": header_length, "Content-Type": "application/octet-stream"}
    response = await client.post("/v2/models/fake/infer", content=body, headers=headers)
    assert response.status_code == 400, response.text


async def test_a_binary_size_past_the_body_and_a_truncated_bytes_element_are_400(client: httpx.AsyncClient) -> None:
    spec, data = image_input([RED])
    body, headers = binary_request({"inputs": [spec]}, data[:-5])
    assert (await client.post("/v2/models/fake/infer", content=body, headers=headers)).status_code == 400
    broken = struct.pack("<I", 1000) + b"short"
    spec = {"name": "IMAGE", "shape": [1, 1], "datatype": "BYTES", "parameters": {"binary_data_size": len(broken)}}
    body, headers = binary_request({"inputs": [spec]}, broken)
    response = await client.post("/v2/models/fake/infer", content=body, headers=headers)
    assert response.status_code == 400 and "runs past the end" in response.json()["error"]


async def test_not_ready_is_400_as_the_protocol_says(serve: ClientFactory) -> None:
    engine = fake_engine()
    async with serve(engine) as client:
        await engine.stop(1)
        assert (await client.get("/v2/health/ready")).status_code == 400
        assert (await client.get("/v2/models/fake/ready")).json() == {"ready": False}
        assert (await client.get("/v2/health/live")).status_code == 200


async def test_oip_requests_share_the_batcher_and_metrics(serve: ClientFactory) -> None:
    model = FakeViT()
    async with serve(fake_engine(fake_served_model(module=model))) as client:
        model.batch_sizes.clear()
        spec, data = image_input(IMAGES)
        body, headers = binary_request({"inputs": [spec]}, data)
        response = await client.post("/v2/models/fake/infer", content=body, headers=headers)
        assert "inference;dur=" in response.headers["server-timing"]
        metrics = (await client.get("/metrics")).text
    assert sum(model.batch_sizes) == 3
    assert 'vit_requests_total{code="200",endpoint="/v2/models/{name}/infer",model="fake"} 1.0' in metrics
    assert 'vit_images_total{model="fake"} 3.0' in metrics
