"""Optional API keys: `Authorization: Bearer <key>` on everything but the probes, the API docs and the demo page.

The keys are checked by `app.protocols.api_keys` (several at once, for rotation; in constant time). Keys are never
logged: the access log carries no headers.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from app.http.error_handlers import error_response
from app.protocols.api_keys import ApiKeys, bearer_token

# Kubernetes and load balancers probe without credentials; the docs describe the API and hold no data; the demo page
# (`/` and its files under /static/) holds none either, and asks the person for the key its API calls send.
OPEN_PATHS = frozenset(
    {
        "/healthz",
        "/readyz",
        "/v2/health/live",
        "/v2/health/ready",
        "/docs",
        "/docs/oauth2-redirect",
        "/openapi.json",
        "/",
        "/favicon.ico",
    }
)
OPEN_PREFIX = "/static/"
REALM = "vit-serve"


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, *, keys: Sequence[str]) -> None:
        self.app = app
        self._keys = ApiKeys(keys)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _is_open(scope["path"]) or scope["method"] == "OPTIONS":
            await self.app(scope, receive, send)  # OPTIONS: CORS preflights carry no credentials
            return
        token = _bearer_token(scope)
        if token is not None and self._keys.valid(token):
            await self.app(scope, receive, send)
            return
        if token is None:
            message = "this service needs an API key: send the header Authorization: Bearer <key>"
            challenge = f'Bearer realm="{REALM}"'
        else:
            message = "the API key is not valid"
            challenge = f'Bearer realm="{REALM}", error="invalid_token"'
        response = error_response(401, message, "unauthorized")
        response.headers["WWW-Authenticate"] = challenge
        await response(scope, receive, send)


def _is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIX)


def _bearer_token(scope: Scope) -> bytes | None:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return bearer_token(bytes(value))
    return None
