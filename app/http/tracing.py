"""The server span of each HTTP request (`Tracing.server_span`), when tracing is on; the probes and /metrics, polled by
machines, are not traced."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.http.telemetry import QUIET_PATHS, route_template

if TYPE_CHECKING:
    from app.observability.tracing import Tracing


class TracingMiddleware:
    def __init__(self, app: ASGIApp, *, tracing: Tracing, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.tracing = tracing
        self.routes = routes  # the app's, to name a request answered before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in QUIET_PATHS:
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        status = 500  # what the client gets if the app raises before answering

        async def send_with_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        attributes = {
            "http.request.method": method,
            "url.path": scope["path"],
            "url.scheme": scope.get("scheme", "http"),
        }
        with self.tracing.server_span(method, headers, attributes) as span:
            state: dict[str, Any] = scope.setdefault("state", {})
            if span.trace_id is not None:
                state["trace_id"] = span.trace_id  # for the access log
            try:
                await self.app(scope, receive, send_with_status)
            finally:
                route = route_template(scope, self.routes)
                if route:
                    span.rename(f"{method} {route}")
                    span.set_attributes({"http.route": route})
                span.set_attributes({"http.response.status_code": status})
                if status >= 500:
                    span.set_attributes({"error.type": str(status)})
                    span.set_error()
