"""The client library (vit-serve-client): retries and their bounds against scripted answers, then a real server
process."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.photos import jpeg, photo
from tests.support.processes import tiny_server_process
from vit_serve_client import APIError, AsyncClient, Client, RetryPolicy
from vit_serve_client.images import encode

OK_BODY = {"model": "m", "predictions": [{"top_k": [{"index": 3, "label": "three", "score": 0.9}]}]}
NO_WAIT = RetryPolicy(attempts=4, base_delay_s=0, max_delay_s=0)


def scripted(answers: list[Callable[[httpx.Request], httpx.Response]]) -> tuple[httpx.MockTransport, list[int]]:
    """A transport that answers each request with the next function of `answers` (the last one repeats)."""
    seen: list[int] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(len(seen))
        return answers[min(len(seen), len(answers)) - 1](request)

    return httpx.MockTransport(handle), seen


def busy(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503, json={"error": "full", "code": "queue_full"}, headers={"Retry-After": "0"})


def ok(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=OK_BODY)


def refused(request: httpx.Request) -> httpx.Response:
    raise httpx.ConnectError("connection refused", request=request)


def test_busy_answers_and_connection_errors_are_tried_again_until_one_succeeds() -> None:
    transport, seen = scripted([busy, refused, ok])
    with Client("http://test", transport=transport, retry=NO_WAIT) as client:
        predictions = client.classify(b"image bytes")
    assert predictions[0].top_k[0].label == "three"
    assert len(seen) == 3 and client.retries == 2


def test_retries_are_bounded_and_the_last_answer_is_raised() -> None:
    transport, seen = scripted([busy])
    with Client("http://test", transport=transport, retry=NO_WAIT) as client, pytest.raises(APIError) as raised:
        client.classify(b"image bytes")
    assert raised.value.status == 503 and raised.value.code == "queue_full"
    assert len(seen) == 4  # NO_WAIT allows 4 attempts in all


def test_an_unreachable_server_is_an_api_error_with_status_0() -> None:
    transport, seen = scripted([refused])
    with Client("http://test", transport=transport, retry=NO_WAIT) as client, pytest.raises(APIError) as raised:
        client.classify(b"image bytes")
    assert raised.value.status == 0 and "cannot reach" in raised.value.message and len(seen) == 4


def test_no_answer_in_time_and_a_broken_connection_have_codes_of_their_own() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    def cut(request: httpx.Request) -> httpx.Response:
        raise httpx.RemoteProtocolError("server disconnected", request=request)

    for answer, code, words in [(slow, "timeout", "no answer in time from"), (cut, "connection_error", "broke off")]:
        transport, _ = scripted([answer])
        with Client("http://test", transport=transport, retry=NO_WAIT) as client, pytest.raises(APIError) as raised:
            client.classify(b"image bytes")
        assert (raised.value.status, raised.value.code) == (0, code) and words in raised.value.message


def test_app_client_is_the_client_distributions_own() -> None:
    import app.client
    import vit_serve_client

    assert all(getattr(app.client, name) is getattr(vit_serve_client, name) for name in vit_serve_client.__all__)
    assert app.client.__all__ == vit_serve_client.__all__


def test_a_client_error_is_not_tried_again_and_names_its_image() -> None:
    def bad(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": "cannot decode image", "code": "invalid_image", "index": 1})

    transport, seen = scripted([bad])
    with Client("http://test", transport=transport, retry=NO_WAIT) as client, pytest.raises(APIError) as raised:
        client.classify([b"a", b"b"])
    assert (raised.value.status, raised.value.index, len(seen)) == (400, 1, 1)
    assert raised.value.image_at_fault


def test_retry_after_is_honoured_and_capped() -> None:
    policy = RetryPolicy(max_delay_s=5)
    assert policy.delay(1, httpx.Response(503, headers={"Retry-After": "2"})) == 2
    assert policy.delay(1, httpx.Response(503, headers={"Retry-After": "120"})) == 5
    assert policy.delay(1, httpx.Response(503, headers={"Retry-After": "Wed, 21 Oct 2015 07:28:00 GMT"})) == 0
    assert 0 <= policy.delay(3, httpx.Response(503)) <= 0.8  # no header: jittered backoff, 0.2 x 2^2 at most


async def test_the_async_client_retries_the_same_way() -> None:
    seen: list[int] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        return busy(request) if len(seen) < 3 else ok(request)

    async with AsyncClient("http://test", transport=httpx.MockTransport(handle), retry=NO_WAIT) as client:
        predictions = await client.classify(b"x", top_k=1)
    assert predictions[0].top_k[0].index == 3 and client.retries == 2


def test_images_are_sent_as_given_or_as_lossless_png(tmp_path: Path) -> None:
    array = photo("astronaut")[:64, :48]
    path = tmp_path / "a.jpg"
    path.write_bytes(b"\xff\xd8 jpeg bytes")
    assert encode(path) == (b"\xff\xd8 jpeg bytes", "image/jpeg")
    assert encode(str(path))[0] == b"\xff\xd8 jpeg bytes"
    for image in (array, Image.fromarray(array)):
        data, content_type = encode(image)
        assert content_type == "image/png"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), array)
    with pytest.raises(TypeError, match="cannot send a dict"):
        encode({"not": "an image"})


@pytest.mark.slow
def test_the_client_against_a_real_server(tmp_path: Path) -> None:
    chelsea = photo("chelsea")
    path = tmp_path / "chelsea.jpg"
    path.write_bytes(jpeg(chelsea))
    with tiny_server_process(tmp_path) as url, Client(url) as client:
        assert client.ready()
        assert client.models()["default"] == "tiny"
        predictions = client.classify([path, jpeg(chelsea), Image.fromarray(chelsea), chelsea], top_k=3, logits=True)
        assert len(predictions) == 4 and all(len(p.top_k) == 3 for p in predictions)
        assert predictions[0] == predictions[1]  # the same bytes, as a path and as bytes
        assert predictions[2].logits is not None and predictions[3].logits is not None
        np.testing.assert_allclose(predictions[2].logits, predictions[3].logits)  # PIL and numpy: the same PNG
        with pytest.raises(APIError) as raised:
            client.classify([path, b"not an image"])
        assert raised.value.status == 415 and raised.value.index == 1
        assert client.classify(path, model="tiny")[0].logits is None
        vectors = client.embed([path, chelsea], normalize=True)
        assert vectors.shape == (2, 32) and vectors.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)
        (explained,) = client.explain(path, top_k=2, overlay=True)
        assert [c.index for c in explained.top_k] == [c.index for c in predictions[0].top_k[:2]]
        assert explained.attention.shape == (8, 8) and explained.attention.sum() == pytest.approx(1.0, abs=1e-5)
        assert explained.overlay_png is not None and Image.open(io.BytesIO(explained.overlay_png)).size == (64, 64)

        async def the_same_awaited() -> np.ndarray:
            async with AsyncClient(url) as aclient:
                (again,) = await aclient.explain(path)
                assert again.overlay_png is None and np.allclose(again.attention, explained.attention)
                return await aclient.embed([path, chelsea], normalize=True, model="tiny")

        np.testing.assert_array_equal(asyncio.run(the_same_awaited()), vectors)


def test_the_api_key_goes_with_every_request_as_a_bearer_token() -> None:
    headers: list[str | None] = []

    def handle(request: httpx.Request) -> httpx.Response:
        headers.append(request.headers.get("Authorization"))
        return ok(request) if request.url.path.endswith("classify") else httpx.Response(200, json={"default": "m"})

    with Client("http://test", api_key="s3cret", transport=httpx.MockTransport(handle)) as client:
        client.classify(b"x")
        client.models()
        client.ready()
    assert headers == ["Bearer s3cret"] * 3
