"""OIP tensors: BYTES elements (4-byte little-endian length + bytes) and FP32 data, from JSON or binary."""

from __future__ import annotations

import base64
import binascii
import struct
from collections.abc import Iterable
from typing import Any

import numpy as np

from app.errors import BadRequest

_LENGTH = struct.Struct("<I")


def pack_bytes(elements: Iterable[bytes]) -> bytes:
    """A BYTES tensor in the binary extension's layout: each element as a uint32 LE length, then its bytes."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def unpack_bytes(data: bytes | memoryview, name: str) -> list[bytes]:
    """The elements of a binary BYTES tensor; the lengths must account for every byte."""
    view = memoryview(data)
    elements: list[bytes] = []
    offset = 0
    while offset < len(view):
        if offset + 4 > len(view):
            raise _invalid(name, "binary BYTES data ends inside an element's 4-byte length")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += 4
        if offset + length > len(view):
            raise _invalid(name, f"binary BYTES element of {length} bytes runs past the end of the data")
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    return elements


def is_packed_bytes(data: bytes) -> bool:
    """Whether `data` parses exactly as length-prefixed BYTES elements (an encoded image never does: its magic
    number read as a length runs past the end)."""
    try:
        return len(unpack_bytes(data, "")) > 0
    except BadRequest:
        return False


def bytes_from_json(data: Any, name: str) -> list[bytes]:
    """JSON BYTES elements: strings holding base64 (images are binary, so JSON carries them encoded)."""
    elements = list(_flatten(data))
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
    expected = int(np.prod(shape)) * 4
    if len(data) != expected:
        raise _invalid(name, f"FP32 data of shape {shape} needs {expected} bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<f4").reshape(shape).copy()


def fp32_from_json(data: Any, shape: list[int], name: str) -> np.ndarray:
    try:
        array = np.asarray(list(_flatten(data)), dtype=np.float32)
    except (TypeError, ValueError):
        raise _invalid(name, "FP32 data in JSON must be numbers") from None
    if array.size != int(np.prod(shape)):
        raise _invalid(name, f"shape {shape} needs {int(np.prod(shape))} values, got {array.size}")
    return array.reshape(shape)


def _flatten(data: Any) -> Iterable[Any]:
    """OIP allows JSON tensor data flat or nested row-major."""
    if isinstance(data, list):
        for item in data:
            yield from _flatten(item)
    else:
        yield data


def _invalid(name: str, problem: str) -> BadRequest:
    where = f"input {name!r}: " if name else ""
    return BadRequest(f"{where}{problem}", code="invalid_tensor")
