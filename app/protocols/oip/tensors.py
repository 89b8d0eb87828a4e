"""OIP tensors: BYTES elements (4-byte little-endian length + bytes) and FP32 data, from JSON, binary or typed values
(gRPC's `contents`).

Every reader is bounded by the count its caller allows (from the declared shape, itself checked against the limits):
it stops at the first element past it, so the work is bounded by the limits, never by what the body holds.
"""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from app.errors import BadRequest

_LENGTH = struct.Struct("<I")
_NUMBERS = frozenset({int, float})  # JSON numbers; not bool (a subclass of int), not strings


def pack_bytes(elements: Iterable[bytes]) -> bytes:
    """A BYTES tensor in the binary extension's layout: each element as a uint32 LE length, then its bytes."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def unpack_bytes(data: bytes | memoryview, name: str, *, limit: int | None = None) -> list[bytes]:
    """The elements of a binary BYTES tensor; the lengths must account for every byte. With a `limit`, stops at
    `limit` + 1 elements: the caller refuses a tensor of more than it allows without the rest being read."""
    view = memoryview(data)
    limit = len(view) if limit is None else limit  # no more elements than bytes
    elements: list[bytes] = []
    offset = 0
    while offset < len(view) and len(elements) <= limit:
        if offset + 4 > len(view):
            raise _invalid(name, "binary BYTES data ends inside an element's 4-byte length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise _invalid(name, f"binary BYTES element of {length} bytes runs past the end of the data")
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def packed_count(data: bytes, *, limit: int) -> int:
    """How many length-prefixed BYTES elements `data` holds, reading at most `limit` + 1 of them; 0 if it is not
    such a tensor (an encoded image never is: its magic number read as a length runs past the end)."""
    try:
        return len(unpack_bytes(data, "", limit=limit))
    except BadRequest:
        return 0


def bytes_from_json(data: Any, name: str, *, count: int) -> list[bytes]:
    """JSON BYTES elements, `count` of them: strings holding base64 (images are binary, so JSON carries them
    encoded)."""
    elements = _flatten(data, name, count)
    out = []
    for index, element in enumerate(elements):
        if not isinstance(element, str):
            raise _invalid(name, f"element {index} of a BYTES tensor in JSON must be a base64 string")
        try:
            out.append(base64.b64decode(element, validate=True))
        except binascii.Error:
            raise _invalid(name, f"element {index} is not valid base64") from None
    return out


def fp32_from_binary(data: bytes | memoryview, shape: list[int], name: str) -> np.ndarray:
    expected = _product(shape) * 4
    if len(data) != expected:
        raise _invalid(name, f"FP32 data of shape {shape} needs {expected} bytes, got {len(data)}")
    return _finite(np.frombuffer(data, dtype="<f4").reshape(shape).copy(), name)


def fp32_from_json(data: Any, shape: list[int], name: str) -> np.ndarray:
    """JSON numbers (not strings, not booleans), exactly as many as `shape` holds, all finite as float32."""
    count = _product(shape)
    elements = _flatten(data, name, count)
    if not set(map(type, elements)) <= _NUMBERS:
        raise _invalid(name, "FP32 data in JSON must be numbers (not strings, booleans or null)")
    with np.errstate(over="ignore"):  # a value past float32's range becomes inf, refused below
        array = np.array(elements, dtype=np.float32)
    return _finite(array.reshape(shape), name)


def bytes_from_values(values: Sequence[bytes], name: str, *, count: int) -> list[bytes]:
    """Typed BYTES elements (gRPC's `bytes_contents`), exactly `count` of them."""
    _check_count(len(values), count, name)
    return list(values)


def fp32_from_values(values: Sequence[float], shape: list[int], name: str) -> np.ndarray:
    """Typed FP32 elements (gRPC's `fp32_contents`), exactly as many as `shape` holds, all finite."""
    _check_count(len(values), _product(shape), name)
    return _finite(np.asarray(values, dtype=np.float32).reshape(shape), name)


def _check_count(found: int, count: int, name: str) -> None:
    if found != count:
        raise _invalid(name, f"its shape holds {count} elements, the data {found}")


def _finite(array: np.ndarray, name: str) -> np.ndarray:
    if not np.isfinite(array).all():
        raise _invalid(name, "FP32 data holds NaN or infinity (or a number out of float32's range)")
    return array


def _flatten(data: Any, name: str, count: int) -> list[Any]:
    """The `count` elements of JSON tensor data, flat or nested row-major (as OIP allows). The walk stops at the
    first element (or nested list) more than a tensor of `count` elements can have."""
    if not isinstance(data, list):
        raise _invalid(name, "tensor data in JSON must be an array")
    if len(data) > count:
        raise _too_many(name, count)
    if not any(isinstance(item, list) for item in data):
        elements = data
    else:
        elements = []
        budget = 2 * count + 64  # nested lists of a tensor of `count` elements: fewer than `count`, in any shape
        stack: list[Iterable[Any]] = [iter(data)]
        while stack:
            for item in stack[-1]:
                budget -= 1
                if budget < 0 or len(elements) > count:
                    raise _too_many(name, count)
                if isinstance(item, list):
                    stack.append(iter(item))
                    break
                elements.append(item)
            else:
                stack.pop()
    _check_count(len(elements), count, name)
    return elements


def _product(shape: list[int]) -> int:
    product = 1
    for size in shape:  # Python integers: no overflow, whatever the sizes (checked by the caller)
        product *= size
    return product


def _too_many(name: str, count: int) -> BadRequest:
    return _invalid(name, f"the data holds more elements than its shape's {count}")


def _invalid(name: str, problem: str) -> BadRequest:
    where = f"input {name!r}: " if name else ""
    return BadRequest(f"{where}{problem}", code="invalid_tensor")
