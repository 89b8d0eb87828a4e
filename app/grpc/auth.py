"""Optional API keys for gRPC calls: metadata `authorization: Bearer <key>`, checked as HTTP checks its header
(`app.protocols.api_keys`: several keys, constant time), on every call but the probes, health and reflection: the
probes as HTTP's /v2/health/*, reflection describing the API as /openapi.json does. Keys are never logged."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from app.grpc.methods import Around, AroundCalls, Context, is_probe
from app.grpc.status import ERROR_CODE
from app.protocols.api_keys import ApiKeys, bearer_token

REFLECTION = "/grpc.reflection."  # v1 and v1alpha
MISSING = "this service needs an API key: send the metadata authorization: Bearer <key>"
INVALID = "the API key is not valid"


class ApiKeyInterceptor(AroundCalls):
    def __init__(self, keys: ApiKeys) -> None:
        self._keys = keys

    def around(self, call: grpc.HandlerCallDetails) -> Around | None:
        if is_probe(call.method) or call.method.startswith(REFLECTION):
            return None
        token = bearer_token(_authorization(call.invocation_metadata))
        if token is not None and self._keys.valid(token):
            return None
        return lambda context: _refused(context, MISSING if token is None else INVALID)


@asynccontextmanager
async def _refused(context: Context, message: str) -> AsyncIterator[None]:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message, ((ERROR_CODE, "unauthorized"),))
    yield  # never reached: `abort` raises


def _authorization(metadata: Any) -> bytes | None:
    for key, value in metadata or ():
        if key == "authorization":
            return value.encode() if isinstance(value, str) else bytes(value)
    return None
