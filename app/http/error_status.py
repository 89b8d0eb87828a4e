"""The one table from a domain error to its HTTP status code. Only the HTTP layer knows status codes; the domain error
says whose fault it is (`app.errors.Fault`), and a test holds the two together: a client's fault is a 4xx, an overload a
503 or 504, the service's own failure a 500."""

from __future__ import annotations

from app.errors import (
    BadRequest,
    ClientDisconnected,
    Conflict,
    DeadlineExceeded,
    Forbidden,
    InferenceFailed,
    InvalidParameter,
    ModelLoadFailed,
    ModelNotFound,
    PayloadTooLarge,
    ServeError,
    Unavailable,
    UnsupportedMediaType,
)

STATUS: dict[type[ServeError], int] = {
    ServeError: 500,
    BadRequest: 400,  # and InvalidImage
    ModelLoadFailed: 400,  # as Triton answers a failed load
    Forbidden: 403,
    ModelNotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidParameter: 422,
    ClientDisconnected: 499,  # nginx's code: nobody reads it
    InferenceFailed: 500,
    Unavailable: 503,  # and QueueFull, NotReady: with Retry-After
    DeadlineExceeded: 504,
}


def status_of(error: ServeError | type[ServeError]) -> int:
    """The status code of an error (or error class): that of its nearest class in `STATUS`."""
    cls = error if isinstance(error, type) else type(error)
    return next(STATUS[c] for c in cls.__mro__ if c in STATUS)
