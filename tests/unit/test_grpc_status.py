"""The gRPC layer's one table gives every domain error a status code that agrees with its fault, as HTTP's does."""

from __future__ import annotations

import inspect

import grpc
import pytest

from app import errors
from app.errors import Fault, InvalidImage, QueueFull, ServeError
from app.grpc.status import CODES, code_of, details_of, error_metadata

ERROR_CLASSES = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, ServeError) and cls is not ServeError
]
OVERLOAD = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
SERVICE = {grpc.StatusCode.INTERNAL}


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_each_error_gets_a_code_that_agrees_with_its_fault(cls: type[ServeError]) -> None:
    code = code_of(cls)
    assert code is not grpc.StatusCode.OK
    if cls.fault.clients:
        assert code not in OVERLOAD | SERVICE | {grpc.StatusCode.UNKNOWN}
    elif cls.fault is Fault.OVERLOAD:
        assert code in OVERLOAD
    else:
        assert code in SERVICE


def test_the_table_names_only_domain_errors_and_the_base_answers_internal() -> None:
    assert all(issubclass(cls, ServeError) for cls in CODES)
    assert code_of(ServeError("boom")) is grpc.StatusCode.INTERNAL


def test_the_metadata_carry_the_code_the_image_and_when_to_retry() -> None:
    image = InvalidImage("cannot decode image", index=2)
    assert code_of(image) is grpc.StatusCode.INVALID_ARGUMENT
    assert details_of(image) == "image 2: cannot decode image"
    assert dict(error_metadata(image)) == {"vit-error-code": "invalid_image", "vit-error-index": "2"}
    full = QueueFull("at capacity", retry_after_s=3)
    assert details_of(full) == "at capacity"
    assert dict(error_metadata(full)) == {
        "vit-error-code": "queue_full",
        "retry-after": "3",
        "grpc-retry-pushback-ms": "3000",
    }
