"""The batch predictor: the server's model, decode and forward without a server. Its logits and embeddings are
`/v1/classify`'s and `/v1/embed`'s for the same images (the real app in this process, the same tiny ViT folder), a bad
image fails alone with the code the API gives it, and the next chunk decodes while one runs through the forward."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.config.settings import Settings
from app.engine.facade import Engine
from app.engine.predictor import Predictor, ReadImage
from app.errors import InvalidParameter
from tests.support.batch_images import BAD, write_image_folder, write_tiny_repository
from tests.support.inprocess import ClientFactory
from tests.support.photos import photo_jpegs

FP32_ATOL = 1e-5


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_repository(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def settings(repository: Path) -> Settings:
    return Settings(model_repository=repository, model=["tiny"], device="cpu", max_batch_size=8)


@pytest.fixture(scope="module")
def predictor(settings: Settings) -> Iterator[Predictor]:
    with Predictor(settings) as predictor:
        yield predictor


async def answer(client: httpx.AsyncClient, path: str, data: bytes, **params: str) -> dict[str, Any]:
    response = await client.post(
        path, content=data, headers={"Content-Type": "application/octet-stream"}, params=params
    )
    body: dict[str, Any] = response.json()
    return body


async def test_logits_and_embeddings_are_the_servers_for_every_image_and_bad_ones_fail_alone_with_its_code(
    tmp_path: Path, settings: Settings, predictor: Predictor, serve: ClientFactory
) -> None:
    files = write_image_folder(tmp_path / "images")
    images = {p.name: p.read_bytes() for p in files if not p.is_symlink()}
    images.update(photo_jpegs())  # the real photographs, a camera-sized one among them
    results = predictor.predict(list(images.values()), top_k=3, logits=True, embedding=True)
    assert len(results) == len(images)
    async with serve(Engine.load(settings)) as client:
        for (name, data), result in zip(images.items(), results, strict=True):
            classified = await answer(client, "/v1/classify", data, logits="true")
            if name in BAD:
                assert result.prediction is None and result.failure is not None, name
                assert result.failure.code == classified["code"], name
                continue
            assert result.failure is None and result.prediction is not None, (name, result.failure)
            prediction = classified["predictions"][0]
            assert result.prediction.logits is not None and result.embedding is not None
            np.testing.assert_allclose(result.prediction.logits, prediction["logits"], atol=FP32_ATOL, err_msg=name)
            assert [s.index for s in result.prediction.top_k] == [s["index"] for s in prediction["top_k"][:3]]
            embedded = await answer(client, "/v1/embed", data)
            np.testing.assert_allclose(result.embedding, embedded["embeddings"][0], atol=FP32_ATOL)
    assert {r.failure.code for r in results if r.failure} >= {"invalid_image", "unsupported_image_format"}


def test_a_file_that_cannot_be_read_is_a_failed_result(predictor: Predictor, tmp_path: Path) -> None:
    good = photo_jpegs()["chelsea"]
    reads: list[ReadImage] = [functools.partial(bytes, good), (tmp_path / "missing.jpg").read_bytes]
    results = list(predictor.stream(reads, predictor.outputs()))
    assert results[0].prediction is not None and len(results[0].prediction.top_k) == 5
    assert results[1].failure is not None and results[1].failure.code == "unreadable"


def test_the_next_chunk_decodes_while_one_runs_through_the_forward(predictor: Predictor) -> None:
    """The first chunk's forward waits until an image of the second chunk is being read: without the overlap it would
    wait in vain (and fail the test after the bound)."""
    data = photo_jpegs()["coffee"]
    second_chunk_read = threading.Event()
    chunk = predictor.chunk_size

    def read(index: int) -> bytes:
        if index >= chunk:
            second_chunk_read.set()
        return data

    forward = predictor.model.forward
    overlapped: list[bool] = []

    def forward_after_the_next_read(images: list[object]) -> object:
        if not overlapped:
            overlapped.append(second_chunk_read.wait(timeout=30))
        return forward(images)  # type: ignore[arg-type]

    predictor.model.forward = forward_after_the_next_read  # type: ignore[method-assign,assignment]
    try:
        before = predictor.images_processed
        results = list(predictor.stream([functools.partial(read, i) for i in range(3 * chunk)], predictor.outputs()))
    finally:
        del predictor.model.forward
    assert overlapped == [True]
    assert len(results) == 3 * chunk and all(r.prediction for r in results)
    assert predictor.images_processed - before == 3 * chunk


def test_outputs_the_model_cannot_give_are_refused(predictor: Predictor) -> None:
    with pytest.raises(InvalidParameter, match="top_k must be between 1 and 10"):
        predictor.outputs(top_k=11)
