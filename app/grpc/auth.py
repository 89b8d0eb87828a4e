"""Optional API keys for gRPC calls: metadata `authorization: Bearer <key>`, checked as HTTP checks its header
(`app.protocols.api_keys`: several keys, constant time), on every call but the probes, health and reflection: the
probes as HTTP's /v2/health/*, reflection describing the API as /openapi.json does. Keys are never logged."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc

from app.grpc.methods import Context, is_probe, wrap
from app.grpc.status import ERROR_CODE
from app.protocols.api_keys import ApiKeys, bearer_token

REFLECTION = "/grpc.reflection."  # v1 and v1alpha
MISSING = "this service needs an API key: send the metadata authorization: Bearer <key>"
INVALID = "the API key is not valid"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or is_probe(method) or method.startswith(REFLECTION):
            return handler
        token = bearer_token(_authorization(handler_call_details.invocation_metadata))
        if token is not None and self._keys.valid(token):
            return handler
        return wrap(handler, lambda context: _refused(context, MISSING if token is None else INVALID))


@asynccontextmanager
async def _refused(context: Context, message: str) -> AsyncIterator[None]:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message, ((ERROR_CODE, "unauthorized"),))
    yield  # never reached: `abort` raises


def _authorization(metadata: Any) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value.encode() if isinstance(value, str) else bytes(value)
    return None
