"""Metrics, request ids, Server-Timing, the access log, and probes that tell the truth under load."""

from __future__ import annotations

import asyncio
import base64
import logging
import re

import httpx
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config.settings import BatchingConfig
from app.observability.logs import JsonFormatter, TextFormatter
from tests.support.fakes import FakeViT, distinct_colors, fake_engine, fake_served_model, image_bytes, served_model_of
from tests.support.inprocess import ClientFactory
from tests.support.waiting import wait_until

RED = image_bytes((255, 0, 0))
PNG = {"Content-Type": "image/png"}


async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client's own parser: {(sample name, sorted labels): value}."""
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_metrics_count_a_known_workload_exactly(serve: ClientFactory) -> None:
    model = FakeViT()
    batching = BatchingConfig(max_batch_size=4, max_queue_delay_ms=0, max_queue_size=64)
    async with serve(fake_engine(fake_served_model(module=model, batching=batching))) as client:
        model.batch_sizes.clear()
        # Sequential requests: 3 single images, then one request of 3 images, then one of 2.
        for color in distinct_colors(3):
            assert (await client.post("/v1/classify", content=image_bytes(color), headers=PNG)).status_code == 200
        three = [("f", (f"{i}.png", image_bytes(c), "image/png")) for i, c in enumerate(distinct_colors(3))]
        assert (await client.post("/v1/classify", files=three)).status_code == 200
        two = {"images": [base64.b64encode(RED).decode()] * 2}
        assert (await client.post("/v1/models/fake/classify", json=two)).status_code == 200
        # Rejections: an undecodable image, a bad parameter, an unknown model.
        assert (await client.post("/v1/classify", content=b"nope", headers=PNG)).status_code == 415
        assert (await client.post("/v1/classify", content=RED, headers=PNG, params={"top_k": 0})).status_code == 422
        assert (await client.post("/v1/models/other/classify", content=RED, headers=PNG)).status_code == 404
        samples = await scrape(client)

    sizes = model.batch_sizes
    assert sum(sizes) == 8  # 3 + 3 + 2 images reached the model
    assert value(samples, "vit_images_total", model="fake") == 8
    assert value(samples, "vit_batch_size_count", model="fake") == len(sizes)
    assert value(samples, "vit_batch_size_sum", model="fake") == 8
    for bound in (1, 2, 3, 4):  # the histogram holds exactly the batches the model saw
        expected = sum(1 for size in sizes if size <= bound)
        assert value(samples, "vit_batch_size_bucket", model="fake", le=f"{bound}.0") == expected
    assert value(samples, "vit_queue_wait_seconds_count", model="fake") == 8
    assert value(samples, "vit_preprocess_seconds_count", model="fake") == 8
    assert value(samples, "vit_inference_seconds_count", model="fake") == len(sizes)
    requests = {"model": "fake", "endpoint": "/v1/classify"}
    assert value(samples, "vit_requests_total", code="200", **requests) == 4
    assert value(samples, "vit_requests_total", code="200", model="fake", endpoint="/v1/models/{name}/classify") == 1
    assert value(samples, "vit_requests_total", code="415", **requests) == 1
    assert value(samples, "vit_requests_total", code="422", **requests) == 1
    # An unknown model name is not a label (no unbounded label values from clients).
    assert value(samples, "vit_requests_total", code="404", model="", endpoint="/v1/models/{name}/classify") == 1
    assert value(samples, "vit_request_duration_seconds_count", **requests) == 6
    assert value(samples, "vit_rejected_total", model="fake", reason="invalid_input") == 2
    assert value(samples, "vit_rejected_total", model="", reason="invalid_input") == 1
    assert value(samples, "vit_rejected_total", model="fake", reason="queue_full") == 0
    assert value(samples, "vit_queue_depth", model="fake") == 0
    assert value(samples, "vit_model_ready", model="fake") == 1
    assert value(samples, "vit_inflight_requests") == 1  # the scrape itself
    assert value(samples, "process_resident_memory_bytes") > 0


async def test_rejections_are_counted_by_reason(serve: ClientFactory) -> None:
    model = FakeViT()
    batching = BatchingConfig(max_batch_size=1, max_queue_delay_ms=0, max_queue_size=1)
    async with serve(fake_engine(fake_served_model(module=model, batching=batching))) as client:
        model.hold()
        held = asyncio.create_task(client.post("/v1/classify", content=RED, headers=PNG))
        await model.wait_until_in_forward()
        queued = asyncio.create_task(client.post("/v1/classify", content=RED, headers=PNG))
        served = served_model_of(client)
        await wait_until(lambda: served.batcher.queued == 1)
        assert (await client.post("/v1/classify", content=RED, headers=PNG)).status_code == 503
        model.release()
        await asyncio.gather(held, queued)
        model.fail_next = True
        assert (await client.post("/v1/classify", content=RED, headers=PNG)).status_code == 500
        samples = await scrape(client)
    assert value(samples, "vit_rejected_total", model="fake", reason="queue_full") == 1
    assert value(samples, "vit_rejected_total", model="fake", reason="error") == 1
    assert value(samples, "vit_images_total", model="fake") == 2  # the failed batch's image is not counted


async def test_request_id_is_echoed_or_made(client: httpx.AsyncClient) -> None:
    given = await client.post("/v1/classify", content=RED, headers={**PNG, "X-Request-ID": "client-id-42"})
    assert given.headers["x-request-id"] == "client-id-42"
    made = await client.get("/healthz")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    hostile = await client.get("/healthz", headers={"X-Request-ID": "a b\tc" + "x" * 200})
    assert re.fullmatch(r"[0-9a-f]{32}", hostile.headers["x-request-id"])  # not echoed into logs and headers
    error = await client.post("/v1/classify", content=b"", headers={**PNG, "X-Request-ID": "err-1"})
    assert error.headers["x-request-id"] == "err-1"


async def test_server_timing_says_where_the_time_went(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/classify", content=RED, headers=PNG)
    parts = dict(re.findall(r"(\w+);dur=([\d.]+)", response.headers["server-timing"]))
    assert set(parts) == {"preprocess", "queue", "inference"}
    assert all(float(v) >= 0 for v in parts.values()) and float(parts["preprocess"]) > 0


async def test_one_access_log_line_per_request_with_timings_and_no_image_bytes(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="app.access")
    body = {"images": [base64.b64encode(RED).decode()]}
    await client.post("/v1/classify", json=body, headers={"X-Request-ID": "log-me"})
    await client.get("/healthz")
    lines = [r for r in caplog.records if r.name == "app.access"]
    assert len(lines) == 2
    classify, probe = lines
    assert classify.levelno == logging.INFO and probe.levelno == logging.DEBUG  # probes stay out of INFO
    fields = classify.fields  # type: ignore[attr-defined]
    assert fields["request_id"] == "log-me" and fields["status"] == 200 and fields["model"] == "fake"
    assert fields["method"] == "POST" and fields["path"] == "/v1/classify" and fields["images"] == 1
    assert {"total_ms", "preprocess_ms", "queue_wait_ms", "inference_ms"} <= set(fields)
    line = JsonFormatter().format(classify)
    parsed = orjson.loads(line)
    assert parsed["level"] == "info" and parsed["request_id"] == "log-me" and "time" in parsed
    assert body["images"][0][:40] not in line
    assert "request_id=log-me" in TextFormatter().format(classify)


async def test_probes_answer_while_the_model_is_held_mid_forward(serve: ClientFactory) -> None:
    """The event loop never waits for the model: probes are served while a full batch is stuck in its forward
    and the queue is full of waiting images."""
    model = FakeViT()
    batching = BatchingConfig(max_batch_size=8, max_queue_delay_ms=60_000, max_queue_size=16)
    async with serve(fake_engine(fake_served_model(module=model, batching=batching))) as client:
        model.batch_sizes.clear()
        model.hold()
        load = [asyncio.create_task(client.post("/v1/classify", content=RED, headers=PNG)) for _ in range(40)]
        await model.wait_until_in_forward()
        assert model.batch_sizes == [8]  # the largest batch is mid-forward
        served = served_model_of(client)
        await wait_until(lambda: served.batcher.queued == 8)
        for _ in range(50):
            for path in ("/healthz", "/readyz"):
                response = await client.get(path)
                assert response.status_code == 200  # saturated is not unready
        # All 100 probes were answered while the model was still held mid-forward: they never wait for it.
        assert not model.gate.is_set() and model.batch_sizes == [8]
        model.release()
        statuses = [r.status_code for r in await asyncio.gather(*load)]
    assert statuses.count(200) == 16 and statuses.count(503) == 24  # 8 computing + 8 queued; the rest shed


async def test_readiness_turns_503_when_a_batcher_dies_and_liveness_stays(serve: ClientFactory) -> None:
    engine = fake_engine()
    async with serve(engine) as client:
        served = engine.model()

        def broken(item: object) -> bool:
            raise RuntimeError("bug in the consumer")

        served.batcher._take = broken  # type: ignore[method-assign]
        response = await client.post("/v1/classify", content=RED, headers=PNG)
        assert response.status_code == 503
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["models"] == {"fake": False}
        assert (await client.get("/healthz")).status_code == 200
        samples = await scrape(client)
        assert value(samples, "vit_model_ready", model="fake") == 0
        assert value(samples, "vit_rejected_total", model="fake", reason="not_ready") == 1
