"""`Client` and `AsyncClient`: the same calls, blocking or awaited, over one pooled httpx connection each.

Every call is sent again on 503 and 429 (after the server's `Retry-After`) and on connection errors, up to
`RetryPolicy.attempts` times in all; what still fails raises `APIError`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import httpx

from app.client.images import ImageLike, encode, name_of
from app.client.results import APIError, Prediction
from app.client.retry import RetryPolicy

DEFAULT_URL = "http://localhost:8000"


@dataclass(frozen=True, slots=True)
class Call:
    """One HTTP request, as data, so that it can be sent again."""

    method: str
    path: str
    params: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, tuple[str, bytes, str]]] | None = None


def classify_call(images: ImageLike | Sequence[ImageLike], model: str | None, top_k: int | None, logits: bool) -> Call:
    many = images if isinstance(images, list | tuple) else [images]
    if not many:
        raise ValueError("classify needs at least one image")
    files = []
    for index, image in enumerate(many):
        data, content_type = encode(image)
        files.append(("image", (name_of(image, index), data, content_type)))
    params = {"logits": "true" if logits else "false"}
    if top_k is not None:
        params["top_k"] = str(top_k)
    path = "/v1/classify" if model is None else f"/v1/models/{model}/classify"
    return Call("POST", path, params, files)


def classify_result(response: httpx.Response) -> list[Prediction]:
    body = checked(response)
    return [Prediction.parse(p) for p in body["predictions"]]


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
    """The last attempt's response, or its connection error as an `APIError` (status 0)."""
    if response is not None:
        return response
    raise APIError(0, "unreachable", f"cannot reach {url}: {type(error).__name__}: {error}") from error


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
        images: ImageLike | Sequence[ImageLike],
        *,
        model: str | None = None,
        top_k: int | None = None,
        logits: bool = False,
    ) -> list[Prediction]:
        """One prediction per image, in order, in one request (a list or tuple is several images)."""
        return classify_result(self.send(classify_call(images, model, top_k, logits)))

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
        images: ImageLike | Sequence[ImageLike],
        *,
        model: str | None = None,
        top_k: int | None = None,
        logits: bool = False,
    ) -> list[Prediction]:
        return classify_result(await self.send(classify_call(images, model, top_k, logits)))

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
