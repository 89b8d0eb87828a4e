"""The one table from a domain error to its gRPC status code, as `app.http.error_status` is HTTP's: a client's fault
is a client's code (INVALID_ARGUMENT, NOT_FOUND, ...), an overload UNAVAILABLE or DEADLINE_EXCEEDED, the service's
own failure INTERNAL (a test holds the table and `app.errors.Fault` together).

The status details are the message REST's JSON error carries, after "image N: " when the error names an image (REST
says so in its JSON's `index`; the details are all a Triton client shows). The trailing metadata carry what REST's
other fields and headers do: `vit-error-code` (the machine code, e.g. `queue_full`), `vit-error-index` (the image),
and for UNAVAILABLE `retry-after` (seconds, as REST's Retry-After header) and `grpc-retry-pushback-ms` (what gRPC's own
retry policy reads)."""

from __future__ import annotations

import grpc

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

ERROR_CODE = "vit-error-code"
ERROR_INDEX = "vit-error-index"
RETRY_AFTER = "retry-after"
RETRY_PUSHBACK = "grpc-retry-pushback-ms"

CODES: dict[type[ServeError], grpc.StatusCode] = {
    ServeError: grpc.StatusCode.INTERNAL,
    BadRequest: grpc.StatusCode.INVALID_ARGUMENT,  # and InvalidImage
    ModelLoadFailed: grpc.StatusCode.INVALID_ARGUMENT,  # REST's 400, as Triton answers a failed load
    Forbidden: grpc.StatusCode.PERMISSION_DENIED,
    ModelNotFound: grpc.StatusCode.NOT_FOUND,
    Conflict: grpc.StatusCode.FAILED_PRECONDITION,  # the service's state forbids it: no retry helps until it changes
    # Not RESOURCE_EXHAUSTED: clients and retry policies read that as "retry later", but an over-limit request never
    # passes; gRPC keeps RESOURCE_EXHAUSTED for a message past its own size limit. The limit is in the message.
    PayloadTooLarge: grpc.StatusCode.INVALID_ARGUMENT,
    UnsupportedMediaType: grpc.StatusCode.INVALID_ARGUMENT,
    InvalidParameter: grpc.StatusCode.INVALID_ARGUMENT,
    ClientDisconnected: grpc.StatusCode.CANCELLED,
    InferenceFailed: grpc.StatusCode.INTERNAL,
    Unavailable: grpc.StatusCode.UNAVAILABLE,  # and QueueFull, NotReady: with retry-after
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def code_of(error: ServeError | type[ServeError]) -> grpc.StatusCode:
    """The status code of an error (or error class): that of its nearest class in `CODES`."""
    cls = error if isinstance(error, type) else type(error)
    return next(CODES[c] for c in cls.__mro__ if c in CODES)


def details_of(error: ServeError) -> str:
    return error.message if error.index is None else f"image {error.index}: {error.message}"


def error_metadata(error: ServeError) -> tuple[tuple[str, str], ...]:
    """The trailing metadata of an error's status: its code, the image it names, when to retry."""
    metadata = [(ERROR_CODE, error.code)]
    if error.index is not None:
        metadata.append((ERROR_INDEX, str(error.index)))
    if isinstance(error, Unavailable):
        metadata += [(RETRY_AFTER, str(error.retry_after_s)), (RETRY_PUSHBACK, str(error.retry_after_s * 1000))]
    return tuple(metadata)
