"""Per-request telemetry: the request id, one access-log line, and the request metrics.

Routes add what they know (model, images, timings) to `request.state`; this middleware reads it when the
response has gone out. The log line never carries request bodies.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability.logs import request_id
from app.observability.metrics import Metrics

log = logging.getLogger("app.access")

REQUEST_ID_HEADER = "x-request-id"
# Polled by machines every few seconds: their lines go to DEBUG, not INFO.
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"})


class TelemetryMiddleware:
    def __init__(self, app: ASGIApp, *, metrics: Metrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's, to name a request answered before routing

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = _request_id(scope)
        state: dict[str, Any] = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500  # what the client gets if the app raises before answering

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.inflight.dec()
            elapsed = time.perf_counter() - started
            self._record(scope, state, status, elapsed)

    def _record(self, scope: Scope, state: dict[str, Any], status: int, elapsed: float) -> None:
        endpoint = route_template(scope, self.routes) or "unmatched"
        model = state.get("model", "")
        label = self.metrics.model_label(model)
        self.metrics.requests.labels(label, endpoint, str(status)).inc()
        self.metrics.request_duration.labels(label, endpoint).observe(elapsed)
        fields: dict[str, Any] = {
            "request_id": state["request_id"],
            "method": scope["method"],
            "path": scope["path"],
            "status": status,
            "total_ms": round(elapsed * 1000, 3),
        }
        if model:
            fields["model"] = model
        if "trace_id" in state:  # traced (`app.http.tracing`)
            fields["trace_id"] = state["trace_id"]
        fields.update(state.get("log_fields", {}))
        level = logging.DEBUG if scope["path"] in QUIET_PATHS else logging.INFO
        log.log(level, "%s %s %d", scope["method"], scope["path"], status, extra={"fields": fields})


def route_template(scope: Scope, routes: Sequence[BaseRoute]) -> str | None:
    """The route's path template, never the raw path (a bounded label set); None when no route matches. A request
    answered before routing (a 401 of the API-key middleware, say) is matched against the app's `routes` here, without
    running them."""
    route = scope.get("route") or next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    path: str | None = getattr(route, "path", None)
    return path


def _request_id(scope: Scope) -> str:
    sent = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"x-request-id"), None)
    return request_id(sent)
