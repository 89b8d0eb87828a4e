"""Domain errors say whose fault they are; the HTTP layer's one table gives each its status, and the two agree."""

from __future__ import annotations

import inspect

import pytest

from app import errors
from app.errors import Fault, InvalidImage, PayloadTooLarge, ServeError
from app.http.error_status import STATUS, status_of

ERROR_CLASSES = [
    cls
    for _, cls in inspect.getmembers(errors, inspect.isclass)
    if issubclass(cls, ServeError) and cls is not ServeError
]


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda cls: cls.__name__)
def test_each_error_gets_a_status_that_agrees_with_its_fault(cls: type[ServeError]) -> None:
    status = status_of(cls)
    if cls.fault.clients:
        assert 400 <= status < 500
    elif cls.fault is Fault.OVERLOAD:
        assert status in (503, 504)
    else:
        assert status >= 500


def test_the_table_names_only_domain_errors_and_the_base_answers_500() -> None:
    assert all(issubclass(cls, ServeError) for cls in STATUS)
    assert status_of(ServeError("boom")) == 500 and ServeError.fault is Fault.SERVICE


def test_an_error_pinned_to_an_image_is_that_images_fault() -> None:
    error = PayloadTooLarge("too many pixels", code="image_too_large")
    assert error.fault is Fault.REQUEST and error.index is None
    assert error.at(2).fault is Fault.IMAGE and error.index == 2
    assert PayloadTooLarge("x", index=0).fault is Fault.IMAGE
    assert InvalidImage("corrupt").fault is Fault.IMAGE
    assert status_of(error) == 413  # the fault moved, the status did not
