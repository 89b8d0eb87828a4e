"""`Client` and `AsyncClient`: the same calls, blocking or awaited, over one pooled httpx connection each.

Every call is sent again on 503 and 429 (after the server's `Retry-After`) and on connection errors, up to
`RetryPolicy.attempts` times in all; what still fails raises `APIError`.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import httpx
import numpy as np

from vit_serve_client.images import ImageLike, encode, name_of
from vit_serve_client.results import APIError, Explanation, Prediction
from vit_serve_client.retry import RetryPolicy

DEFAULT_URL = "http://localhost:8000"


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request, as data, so that it can be sent again."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None


Images = ImageLike | Sequence[ImageLike]


def image_call(endpoint: str, images: Images, model: str | None, options: dict[str, Any]) -> Call:
    """A POST of `images` (a list or tuple is several) to `/v1/<endpoint>` or the model's own, with `options` (None:
    not sent)."""
    many = images if isinstance(images, list | tuple) else [images]
    if not many:
        raise ValueError(f"{endpoint} needs at least one image")
    files = []
    for index, image in enumerate(many):
        data, content_type = encode(image)
        files.append(("image", (name_of(image, index), data, content_type)))
    params = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items() if v is not None}
    path = f"/v1/{endpoint}" if model is None else f"/v1/models/{model}/{endpoint}"
    return Call("POST", path, params, files)


def classify_call(images: Images, model: str | None, top_k: int | None, logits: bool) -> Call:
    return image_call("classify", images, model, {"top_k": top_k, "logits": logits})


def classify_result(response: httpx.Response) -> list[Prediction]:
    body = checked(response)
    return [Prediction.parse(p) for p in body["predictions"]]


def embed_call(images: Images, model: str | None, normalize: bool) -> Call:
    return image_call("embed", images, model, {"normalize": normalize, "encoding_format": "base64"})


def embed_result(response: httpx.Response) -> np.ndarray:
    """(n, dim) float32, from the base64 the call asks for (a quarter of the JSON numbers' size, and exact)."""
    body = checked(response)
    rows = [np.frombuffer(base64.b64decode(row), dtype="<f4") for row in body["embeddings"]]
    return np.stack(rows).astype(np.float32, copy=False)


def explain_call(images: Images, model: str | None, top_k: int | None, overlay: bool) -> Call:
    return image_call("explain", images, model, {"top_k": top_k, "overlay": overlay})


def explain_result(response: httpx.Response) -> list[Explanation]:
    body = checked(response)
    return [Explanation.parse(e) for e in body["explanations"]]


def checked(response: httpx.Response) -> Any:
    """The JSON body of a 2xx answer; else the server's error as an `APIError`."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if not response.is_success:
        raise APIError.from_body(response.status_code, body)
    return body


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _answer(url: str, response: httpx.Response | None, error: Exception | None) -> httpx.Response:
    """The last attempt's response, or its transport error as an `APIError` (status 0): code `unreachable` when no
    connection could be made, `timeout` when the answer took too long, `connection_error` when it broke off."""
    if response is not None:
        return response
    if isinstance(error, httpx.ConnectError | httpx.ConnectTimeout):
        code, what = "unreachable", "cannot reach"
    elif isinstance(error, httpx.TimeoutException):
        code, what = "timeout", "no answer in time from"
    else:
        code, what = "connection_error", "the connection broke off with"
    raise APIError(0, code, f"{what} {url}: {type(error).__name__}: {error}") from error


class Client:
    """A blocking client. `retries` counts the requests it sent again."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = url
        self.retry = retry or RetryPolicy()
        self.retries = 0
        self._http = httpx.Client(base_url=url, headers=_headers(api_key), timeout=timeout_s, transport=transport)

    def classify(
        self,
        images: Images,
        *,
        model: str | None = None,
        top_k: int | None = None,
        logits: bool = False,
    ) -> list[Prediction]:
        """One prediction per image, in order, in one request (a list or tuple is several images)."""
        return classify_result(self.send(classify_call(images, model, top_k, logits)))

    def embed(self, images: Images, *, model: str | None = None, normalize: bool = False) -> np.ndarray:
        """The images' embeddings, (n, dim) float32 in order; unit L2 norm with `normalize`."""
        return embed_result(self.send(embed_call(images, model, normalize)))

    def explain(
        self, images: Images, *, model: str | None = None, top_k: int | None = None, overlay: bool = False
    ) -> list[Explanation]:
        """Per image: its top classes and attention-rollout map, and with `overlay` the map over the image as PNG."""
        return explain_result(self.send(explain_call(images, model, top_k, overlay)))

    def models(self) -> dict[str, Any]:
        """`{"default": name, "models": [...]}`: every served model's description."""
        result: dict[str, Any] = checked(self.send(Call("GET", "/v1/models")))
        return result

    def ready(self) -> bool:
        """Whether the server is ready for traffic now (asked once, no retries)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.TransportError:
            return False

    def send(self, call: Call) -> httpx.Response:
        for attempt in itertools.count(1):
            response, error = None, None
            try:
                response = self._http.request(call.method, call.path, params=call.params, files=call.files)
            except httpx.TransportError as exc:
                error = exc
            wait = self.retry.wait_before_retry(attempt, response, error)
            if wait is None:
                return _answer(self.url, response, error)
            self.retries += 1
            time.sleep(wait)
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class AsyncClient:
    """The same calls as `Client`, awaited; safe to share between tasks."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        *,
        api_key: str | None = None,
        timeout_s: float = 60.0,
        retry: RetryPolicy | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        max_connections: int = 100,
    ) -> None:
        self.url = url
        self.retry = retry or RetryPolicy()
        self.retries = 0
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self._http = httpx.AsyncClient(
            base_url=url, headers=_headers(api_key), timeout=timeout_s, transport=transport, limits=limits
        )

    async def classify(
        self,
        images: Images,
        *,
        model: str | None = None,
        top_k: int | None = None,
        logits: bool = False,
    ) -> list[Prediction]:
        return classify_result(await self.send(classify_call(images, model, top_k, logits)))

    async def embed(self, images: Images, *, model: str | None = None, normalize: bool = False) -> np.ndarray:
        return embed_result(await self.send(embed_call(images, model, normalize)))

    async def explain(
        self, images: Images, *, model: str | None = None, top_k: int | None = None, overlay: bool = False
    ) -> list[Explanation]:
        return explain_result(await self.send(explain_call(images, model, top_k, overlay)))

    async def models(self) -> dict[str, Any]:
        result: dict[str, Any] = checked(await self.send(Call("GET", "/v1/models")))
        return result

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.TransportError:
            return False

    async def send(self, call: Call) -> httpx.Response:
        for attempt in itertools.count(1):
            response, error = None, None
            try:
                response = await self._http.request(call.method, call.path, params=call.params, files=call.files)
            except httpx.TransportError as exc:
                error = exc
            wait = self.retry.wait_before_retry(attempt, response, error)
            if wait is None:
                return _answer(self.url, response, error)
            self.retries += 1
            await asyncio.sleep(wait)
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
