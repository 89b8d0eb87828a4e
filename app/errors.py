"""Domain errors. Each class says its HTTP status and machine code; the HTTP layer maps them all in one place."""

from __future__ import annotations

from pydantic import ValidationError


class ServeError(Exception):
    """Base of every error a client may see. `message` is safe to show; `index` names the offending image."""

    status: int = 500
    code: str = "internal_error"

    def __init__(self, message: str, *, index: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index
        if code is not None:
            self.code = code

    def at(self, index: int) -> ServeError:
        """The same error, pinned to image `index` of a request."""
        self.index = index
        return self


class BadRequest(ServeError):
    """400: a malformed body, or an image that is recognised but cannot be decoded."""

    status = 400
    code = "bad_request"


class InvalidImage(BadRequest):
    """400: the bytes claim an image format but do not decode (truncated, corrupt)."""

    code = "invalid_image"


class ModelNotFound(ServeError):
    """404: no model of that name is served."""

    status = 404
    code = "model_not_found"


class Forbidden(ServeError):
    """403: the call is understood and authenticated, but this service does not allow it."""

    status = 403
    code = "forbidden"


class Conflict(ServeError):
    """409: the request conflicts with the service's state (e.g. unloading the default model)."""

    status = 409
    code = "conflict"


class ModelLoadFailed(ServeError):
    """400: a model named in a load request could not be loaded (its config, weights or warm-up failed); like Triton's
    answer to a failed load. What is served does not change."""

    status = 400
    code = "model_load_failed"


class PayloadTooLarge(ServeError):
    """413: the body, the number of images or an image's pixel count is over its limit."""

    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServeError):
    """415: a content type or an image format the service does not accept."""

    status = 415
    code = "unsupported_media_type"


class InvalidParameter(ServeError):
    """422: a parameter is out of range or unknown."""

    status = 422
    code = "invalid_parameter"


class Unavailable(ServeError):
    """503: the service cannot take this now; the client may retry after `retry_after_s`."""

    status = 503
    code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class QueueFull(Unavailable):
    """503: the model's queue has no room for this request's images."""

    code = "queue_full"


class NotReady(Unavailable):
    """503: the model is not loaded and warmed, its batcher is down, or the service is shutting down."""

    code = "not_ready"


class DeadlineExceeded(ServeError):
    """504: the request did not finish within `request_timeout_s`."""

    status = 504
    code = "deadline_exceeded"


class InferenceFailed(ServeError):
    """500: the forward pass of this request's batch raised; details go to the log, never to the client."""

    status = 500
    code = "inference_failed"


class ModelLoadError(Exception):
    """Start-up cannot load a model; the message is one line that says what to do."""


class ClientDisconnected(ServeError):
    """499 (nginx's code): the client went away; its queued images were dropped. Nobody reads this answer."""

    status = 499
    code = "client_closed_request"


def describe_validation_error(exc: ValidationError) -> str:
    """pydantic's first error as one line a person can act on: where, and what."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "value"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        return f"unknown key {where!r}{more}"
    if first["type"] == "missing":
        return f"missing key {where!r}{more}"
    return f"{where}: {first['msg']}{more}"
