"""The warm-up: what it runs on the CPU, what it measures, and what the service answers while it runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from fastapi import FastAPI

from app.config.settings import Settings
from app.engine.descriptions import Measured
from app.engine.facade import Engine, Limits
from app.http.app import create_app
from tests.support.fakes import FakeViT, fake_engine, fake_served_model, image_bytes

RED = image_bytes((255, 0, 0))


@asynccontextmanager
async def started(engine: Engine) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """The app with its lifespan begun, not waiting for the warm-up (as uvicorn runs it)."""
    app = create_app(Settings(drain_timeout_s=5), engine)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client,
    ):
        yield app, client


async def test_while_warming_up_the_probes_answer_and_readiness_says_why() -> None:
    model = FakeViT()
    model.hold()  # the warm-up's first forward waits here
    engine = fake_engine(fake_served_model(module=model))
    async with started(engine) as (app, client):
        await model.wait_until_in_forward()
        assert (await client.get("/healthz")).status_code == 200
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
        assert (ready.json()["reason"], ready.json()["models"]) == ("warming up", {"fake": False})
        refused = await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"})
        assert (refused.status_code, refused.json()["code"]) == (503, "not_ready")
        assert "warming up" in refused.json()["error"] and refused.headers["retry-after"] == "1"
        assert (await client.get("/v1/models/fake")).json()["measured"] is None

        model.release()
        await app.state.warming
        assert (await client.get("/readyz")).status_code == 200
        answered = await client.post("/v1/classify", content=RED, headers={"Content-Type": "image/png"})
        assert answered.status_code == 200


async def test_the_warm_up_on_the_cpu_runs_one_image_then_times_one_and_the_largest_batch() -> None:
    model = FakeViT()
    engine = fake_engine(fake_served_model(module=model))  # max_batch_size 8
    async with started(engine) as (app, client):
        await app.state.warming
        assert model.batch_sizes == [1, 1, 8]  # warm, timed alone, timed at the largest batch: nothing more
        measured = (await client.get("/v1/models/fake")).json()["measured"]
    assert measured["batch_size"] == 8
    assert measured["images_per_s"] > 0 and measured["latency_ms_batch1"] > 0


async def test_a_failed_warm_up_is_never_ready_and_says_why() -> None:
    model = FakeViT()
    model.fail_next = True
    engine = fake_engine(fake_served_model(module=model))
    async with started(engine) as (app, client):
        with pytest.raises(RuntimeError, match="injected failure"):
            await app.state.warming
        ready = await client.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["reason"] == "warm-up failed: RuntimeError: injected failure"
    assert engine.failure == "warm-up failed: RuntimeError: injected failure"  # the server exits on it


@pytest.mark.parametrize(
    ("on_cpu", "configured", "expected"),
    [(True, None, 8), (False, None, 32), (True, 32, 32), (False, 4, 4)],
)
def test_max_batch_size_defaults_to_the_device_and_a_setting_wins(
    on_cpu: bool, configured: int | None, expected: int
) -> None:
    settings = Settings(max_batch_size=configured)
    assert settings.batching(on_cpu=on_cpu).max_batch_size == expected


async def test_unset_the_request_deadline_covers_four_of_the_largest_batches_at_the_measured_speed() -> None:
    served = fake_served_model()
    engine = fake_engine(served, limits=Limits(16, request_timeout_s=None))
    async with started(engine) as (app, client):
        await app.state.warming
        assert engine.request_timeout_s(served) == 30  # a fast model: the usual 30 s
        served.measured = Measured(batch_size=8, images_per_s=0.5, latency_ms_batch1=1500)  # a busy 2-core CPU
        assert engine.request_timeout_s(served) == 64  # 4 batches of 8 at 0.5 images/s
        assert (await client.get("/v1/models/fake")).json()["request_timeout_s"] == 64
    assert fake_engine(served, limits=Limits(16, request_timeout_s=5)).request_timeout_s(served) == 5  # as set


async def test_stopped_while_warming_up_the_warm_up_starts_no_further_step() -> None:
    model = FakeViT()
    model.hold()
    served = fake_served_model(module=model)
    async with started(fake_engine(served)) as (app, _):
        await model.wait_until_in_forward()  # the first step runs: SIGTERM now
    assert app.state.warming.cancelled()
    model.release()
    await asyncio.get_running_loop().shutdown_default_executor()  # the warm-up's thread has ended
    assert model.batch_sizes == [1] and served.measured is None  # the step under way finished; no other began
