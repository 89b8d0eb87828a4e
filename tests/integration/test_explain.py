"""`/v1/explain`: top-k classes and attention-rollout maps over HTTP, through a queue of its own."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.config.settings import Settings
from app.engine.facade import Engine
from tests.support.fakes import fake_engine, steered_vit, tiny_vit, write_model_folder
from tests.support.inprocess import serve_in_process
from tests.support.photos import photo_jpegs

SIZE = 32  # patch 8: a 4x4 grid


def jpegs(count: int) -> list[bytes]:
    return list(photo_jpegs().values())[:count]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    write_model_folder(tmp_path, "tiny", tiny_vit(image_size=SIZE))
    return Settings(model_repository=tmp_path, model=["tiny"], max_batch_size=4, max_queue_delay_ms=600_000)


def files(images: list[bytes]) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("image", (f"{i}.jpg", body, "image/jpeg")) for i, body in enumerate(images)]


async def test_explain_gives_classifys_top_k_and_a_distribution_over_the_patch_grid(settings: Settings) -> None:
    engine = Engine.load(settings)
    images = jpegs(4)
    async with serve_in_process(engine, settings) as client:
        classified = await client.post("/v1/classify", files=files(images), params={"logits": "false"})
        classify_batches = engine.model().batcher.stats.batches
        explained = await client.post("/v1/models/tiny/explain", files=files(images), params={"top_k": 3})
        assert engine.model().batcher.stats.batches == classify_batches  # the classify queue never saw them
    assert explained.status_code == 200, explained.text
    body = explained.json()
    assert body["model"] == "tiny" and len(body["explanations"]) == 4
    explainer = engine.model().explainer
    assert explainer is not None and explainer.batcher.stats.batch_sizes[-1] == 4  # the four images: one explain batch
    maps = []
    for explanation, prediction in zip(body["explanations"], classified.json()["predictions"], strict=True):
        assert [c["index"] for c in explanation["top_k"]] == [c["index"] for c in prediction["top_k"][:3]]
        for ours, theirs in zip(explanation["top_k"], prediction["top_k"], strict=False):
            assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)  # the same weights, the same answer
        attention = np.array(explanation["attention"])
        assert explanation["grid"] == [4, 4] and attention.shape == (4, 4)
        assert (attention >= 0).all() and attention.sum() == pytest.approx(1.0, abs=1e-5)
        assert "overlay" not in explanation
        maps.append(attention)
    assert len({tuple(np.round(m.ravel(), 6)) for m in maps}) == 4  # each image its own map


async def test_overlay_as_a_data_uri_or_as_the_png_itself(settings: Settings) -> None:
    image = jpegs(1)[0]
    async with serve_in_process(Engine.load(settings), settings) as client:
        as_json = await client.post("/v1/explain", content=image, params={"overlay": "true"})
        as_png = await client.post(
            "/v1/explain", content=image, params={"overlay": "true"}, headers={"Accept": "image/png"}
        )
        two = await client.post(
            "/v1/explain", files=files(jpegs(2)), data={"overlay": "true"}, headers={"Accept": "image/png"}
        )
    uri = as_json.json()["explanations"][0]["overlay"]
    assert uri.startswith("data:image/png;base64,")
    from_json = Image.open(io.BytesIO(base64.b64decode(uri.removeprefix("data:image/png;base64,"))))
    assert (from_json.format, from_json.size, from_json.mode) == ("PNG", (SIZE, SIZE), "RGB")
    assert as_png.status_code == 200 and as_png.headers["content-type"] == "image/png"
    assert "inference;dur=" in as_png.headers["server-timing"]
    assert as_png.content == base64.b64decode(uri.removeprefix("data:image/png;base64,"))
    # Two images cannot be one PNG: the answer is JSON, with an overlay each.
    assert two.headers["content-type"] == "application/json"
    assert all(e["overlay"].startswith("data:image/png") for e in two.json()["explanations"])


async def test_bad_input_and_unsupported_models_get_json_errors_and_the_service_goes_on(settings: Settings) -> None:
    good, bad = jpegs(1)[0], jpegs(1)[0][:200]
    async with serve_in_process(Engine.load(settings), settings) as client:
        broken = await client.post("/v1/explain", files=files([good, bad]))
        zero = await client.post("/v1/explain", content=good, params={"top_k": 0})
        unknown = await client.post("/v1/explain", content=good, params={"logits": "false"})
        after = await client.post("/v1/explain", content=good)
    assert (broken.status_code, broken.json()["code"], broken.json()["index"]) == (400, "invalid_image", 1)
    assert zero.status_code == 422 and unknown.status_code == 422
    assert after.status_code == 200
    async with serve_in_process(fake_engine()) as client:  # a model whose attention cannot be read
        unsupported = await client.post("/v1/explain", content=good)
        info = (await client.get("/v1/models/fake")).json()
    assert (unsupported.status_code, unsupported.json()["code"]) == (422, "explain_unsupported")
    assert info["explain"] is False and info["embedding_dim"] == 0


async def test_explanations_and_classifications_at_once_each_get_their_own_answer(settings: Settings) -> None:
    settings = settings.model_copy(update={"max_queue_delay_ms": 5.0})
    images = jpegs(3)
    async with serve_in_process(Engine.load(settings), settings) as client, asyncio.timeout(60):
        responses = await asyncio.gather(
            *(client.post("/v1/explain", content=image) for image in images),
            *(client.post("/v1/classify", content=image) for image in images),
        )
    assert [r.status_code for r in responses] == [200] * 6
    for explained, classified in zip(responses[:3], responses[3:], strict=True):
        assert (
            explained.json()["explanations"][0]["top_k"][0]["index"]
            == (classified.json()["predictions"][0]["top_k"][0]["index"])
        )


async def test_a_model_whose_attention_is_known_gives_the_known_map_over_http(tmp_path: Path) -> None:
    """Every token of this model attends to patch (1, 3) alone (see `steered_vit`): the served map says so."""
    write_model_folder(tmp_path, "steered", steered_vit((1, 3)))
    settings = Settings(model_repository=tmp_path, model=["steered"])
    async with serve_in_process(Engine.load(settings), settings) as client:
        response = await client.post("/v1/explain", content=jpegs(1)[0])
    attention = np.array(response.json()["explanations"][0]["attention"])
    assert attention.shape == (4, 4) and attention[1, 3] > 0.99
