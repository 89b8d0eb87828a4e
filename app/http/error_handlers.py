"""One place that turns every error into the one JSON shape: {"error": ..., "code": ..., "index"?: ...}."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from app.errors import ClientDisconnected, InferenceFailed, InvalidParameter, ServeError, Unavailable
from app.http.error_status import status_of
from app.http.responses import JSONResponse
from app.observability.metrics import Metrics

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed"}


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ServeError, _serve_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(ClientDisconnect, _client_disconnected)
    app.add_exception_handler(Exception, _unexpected_error)


def _count_rejection(request: Request, error: ServeError) -> None:
    metrics: Metrics | None = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.request_rejected(getattr(request.state, "model", ""), error)


def error_response(status: int, message: str, code: str, *, index: int | None = None) -> JSONResponse:
    body: dict[str, object] = {"error": message, "code": code}
    if index is not None:
        body["index"] = index
    return JSONResponse(body, status_code=status)


async def _serve_error(request: Request, exc: ServeError) -> Response:
    _count_rejection(request, exc)
    if isinstance(exc, InferenceFailed):
        log.error("%s %s: %s", request.method, request.url.path, exc.message, exc_info=exc.__cause__)
    response = error_response(status_of(exc), exc.message, exc.code, index=exc.index)
    if isinstance(exc, Unavailable):
        response.headers["Retry-After"] = str(exc.retry_after_s)
    return response


async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    where = " ".join(str(part) for part in first["loc"])
    error = InvalidParameter(f"{where}: {first['msg']}".strip(": "))
    _count_rejection(request, error)
    return error_response(status_of(error), error.message, error.code)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    response = error_response(exc.status_code, str(exc.detail), code)
    for name, value in (exc.headers or {}).items():
        response.headers[name] = value
    return response


async def _client_disconnected(request: Request, exc: Exception) -> Response:
    """The client went away (or was timed out) while its body was being read: nobody reads this answer."""
    return await _serve_error(request, ClientDisconnected("the client closed the connection before its body ended"))


async def _unexpected_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error in %s %s", request.method, request.url.path)
    _count_rejection(request, ServeError("internal error"))
    return error_response(500, "internal server error", "internal_error")
