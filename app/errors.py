"""Domain errors. Each class says whose fault it is (`Fault`) and its machine code; no HTTP here: the HTTP layer maps
each class to a status code in one table (`app.http.error_status`)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ValidationError


class Fault(StrEnum):
    """Whose fault an error is: what a client (and a metric, and a log) does about it follows from this."""

    IMAGE = "image"  # one image of the request (corrupt, too large, an unsupported format): fix or drop that image
    REQUEST = "request"  # the request as a whole (malformed, an unknown model or option, not allowed): fix the request
    OVERLOAD = (
        "overload"  # the service cannot take or finish it now (full, not ready, too slow): retry, maybe elsewhere
    )
    SERVICE = "service"  # the service failed (a bug, the device): not the client's to fix

    @property
    def clients(self) -> bool:
        """The client's to fix: an image or the request."""
        return self in (Fault.IMAGE, Fault.REQUEST)


class ServeError(Exception):
    """Base of every error a client may see. `message` is safe to show; `index` names the offending image."""

    fault: Fault = Fault.SERVICE
    code: str = "internal_error"

    def __init__(self, message: str, *, index: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index: int | None = None
        if code is not None:
            self.code = code
        if index is not None:
            self.at(index)

    def at(self, index: int) -> ServeError:
        """The same error, pinned to image `index` of a request: a fault of the request's is that image's."""
        self.index = index
        if self.fault is Fault.REQUEST:
            self.fault = Fault.IMAGE
        return self


class BadRequest(ServeError):
    """A malformed body, or an image that is recognised but cannot be decoded."""

    fault = Fault.REQUEST
    code = "bad_request"


class InvalidImage(BadRequest):
    """The bytes claim an image format but do not decode (truncated, corrupt)."""

    fault = Fault.IMAGE
    code = "invalid_image"


class ModelNotFound(ServeError):
    """No model of that name is served."""

    fault = Fault.REQUEST
    code = "model_not_found"


class Forbidden(ServeError):
    """The call is understood and authenticated, but this service does not allow it."""

    fault = Fault.REQUEST
    code = "forbidden"


class Conflict(ServeError):
    """The request conflicts with the service's state (e.g. unloading the default model)."""

    fault = Fault.REQUEST
    code = "conflict"


class ModelLoadFailed(ServeError):
    """A model named in a load request could not be loaded (its config, weights or warm-up failed); as Triton has it,
    the load request's fault. What is served does not change."""

    fault = Fault.REQUEST
    code = "model_load_failed"


class PayloadTooLarge(ServeError):
    """The body, the number of images or an image's pixel count is over its limit."""

    fault = Fault.REQUEST
    code = "payload_too_large"


class UnsupportedMediaType(ServeError):
    """A content type or an image format the service does not accept."""

    fault = Fault.REQUEST
    code = "unsupported_media_type"


class InvalidParameter(ServeError):
    """A parameter is out of range or unknown."""

    fault = Fault.REQUEST
    code = "invalid_parameter"


class Unavailable(ServeError):
    """The service cannot take this now; the client may retry after `retry_after_s`."""

    fault = Fault.OVERLOAD
    code = "unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class QueueFull(Unavailable):
    """The model's queue has no room for this request's images."""

    code = "queue_full"


class NotReady(Unavailable):
    """The model is not loaded and warmed, its batcher is down, or the service is shutting down."""

    code = "not_ready"


class DeadlineExceeded(ServeError):
    """The request did not finish within `request_timeout_s`."""

    fault = Fault.OVERLOAD
    code = "deadline_exceeded"


class InferenceFailed(ServeError):
    """The forward pass of this request's batch raised; details go to the log, never to the client."""

    fault = Fault.SERVICE
    code = "inference_failed"


class ModelLoadError(Exception):
    """Start-up cannot load a model; the message is one line that says what to do."""


class ClientDisconnected(ServeError):
    """The client went away; its queued images were dropped. Nobody reads this answer."""

    fault = Fault.REQUEST
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
