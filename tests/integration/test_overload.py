"""Overload: what does not fit the queue is shed at once with 503, memory stays bounded, accepted work runs in full
batches, and every accepted request gets its own answer. Proved by events and counts, never by the clock."""

from __future__ import annotations

import asyncio
import statistics

import httpx
import pytest

from app.config.settings import BatchingConfig, Settings
from tests.support.fakes import FakeViT, distinct_colors, fake_engine, fake_served_model, image_bytes, served_model_of
from tests.support.inprocess import ClientFactory
from tests.support.waiting import wait_until

BATCH, QUEUE = 4, 16
OFFERED = 4 * QUEUE  # four times what the queue holds, all at once


def _settings() -> Settings:
    # A generous deadline: nothing in these tests may be answered 504, whatever the host's speed.
    return Settings(drain_timeout_s=5, request_timeout_s=60)


def _model_and_engine() -> tuple[FakeViT, BatchingConfig]:
    return FakeViT(), BatchingConfig(max_batch_size=BATCH, max_queue_delay_ms=5, max_queue_size=QUEUE)


async def _classify(client: httpx.AsyncClient, image: bytes) -> httpx.Response:
    return await client.post("/v1/classify?top_k=1", content=image, headers={"Content-Type": "image/png"})


async def _reference_logits(client: httpx.AsyncClient, images: list[bytes]) -> list[list[float]]:
    """Each image's logits, asked one at a time on an idle service."""
    answers = [await _classify(client, image) for image in images]
    assert all(a.status_code == 200 for a in answers)
    return [a.json()["predictions"][0]["logits"] for a in answers]


async def test_a_burst_of_four_queues_is_shed_at_once_and_the_admitted_run_in_full_batches(
    serve: ClientFactory,
) -> None:
    model, batching = _model_and_engine()
    engine = fake_engine(fake_served_model(module=model, batching=batching))
    images = [image_bytes(color) for color in distinct_colors(OFFERED)]
    async with serve(engine, _settings()) as client:
        served = served_model_of(client)
        expected = await _reference_logits(client, images)
        model.batch_sizes.clear()

        # One request holds the model (its forward waits at the gate); the inference slot is taken.
        model.hold()
        first = asyncio.create_task(_classify(client, images[0]))
        await model.wait_until_in_forward()

        burst = [asyncio.create_task(_classify(client, image)) for image in images]
        # Exactly a queue's worth is admitted; everything else is answered while the model is still held, so no
        # 503 waited for the model.
        shed_count = OFFERED - QUEUE
        await wait_until(lambda: sum(task.done() for task in burst) >= shed_count)
        assert not model.gate.is_set() and model.batch_sizes == [1]
        shed = [task.result() for task in burst if task.done()]
        assert len(shed) == shed_count
        for response in shed:
            assert response.status_code == 503
            assert response.json()["code"] == "queue_full"
            assert response.headers["retry-after"] == "1"
        assert served.batcher.depth == QUEUE  # memory bounded: never more than the queue admitted
        await wait_until(lambda: served.batcher.queued == QUEUE)  # all decoded and waiting

        model.release()
        assert (await first).status_code == 200
        responses = await asyncio.gather(*burst)
        admitted = [(i, response) for i, response in enumerate(responses) if response.status_code != 503]
        assert len(admitted) == QUEUE
        for i, response in admitted:
            assert response.status_code == 200
            assert response.json()["predictions"][0]["logits"] == pytest.approx(expected[i], abs=1e-5)
        # The backlog went through in full batches, back to back.
        assert model.batch_sizes == [1] + [BATCH] * (QUEUE // BATCH)
        assert served.batcher.depth == 0
        assert (await _classify(client, images[1])).status_code == 200  # and it still serves


async def test_sustained_overload_sheds_with_503_loses_nothing_and_keeps_batches_full(serve: ClientFactory) -> None:
    model, batching = _model_and_engine()
    model.batch_time_s = 0.02  # the model is the bottleneck, as a busy GPU would be
    engine = fake_engine(fake_served_model(module=model, batching=batching))
    images = [image_bytes(color) for color in distinct_colors(8)]
    clients, rounds = OFFERED, 6
    async with serve(engine, _settings()) as client:
        served = served_model_of(client)
        expected = await _reference_logits(client, images)
        model.batch_sizes.clear()
        depths: list[int] = []
        outcomes: list[tuple[int, httpx.Response]] = []

        async def closed_loop(n: int) -> None:
            # Each client sends its next request as soon as its answer comes, shed or not: the offered load stays
            # at `clients` outstanding requests, four times the queue.
            for r in range(rounds):
                which = (n + r) % len(images)
                response = await _classify(client, images[which])
                outcomes.append((which, response))
                depths.append(served.batcher.depth)

        await asyncio.gather(*(closed_loop(n) for n in range(clients)))

    assert len(outcomes) == clients * rounds  # every request got exactly one answer
    statuses = {response.status_code for _, response in outcomes}
    assert statuses == {200, 503}, statuses  # overloaded, and nothing else: no 504, no 500
    for which, response in outcomes:
        if response.status_code == 503:
            assert response.json()["code"] == "queue_full" and response.headers["retry-after"] == "1"
        else:
            assert response.json()["predictions"][0]["logits"] == pytest.approx(expected[which], abs=1e-5)
    assert max(depths) <= QUEUE
    # Accepted work ran at the model's capacity: with a backlog always waiting, batches were (nearly all) full.
    assert statistics.mean(model.batch_sizes) >= 0.75 * BATCH, model.batch_sizes
