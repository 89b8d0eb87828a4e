"""Reading a classify request: a raw image, multipart files, or JSON with base64 images -> encoded image bytes."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

import orjson
from pydantic import ValidationError
from starlette.requests import Request

from app.api.multipart import read_multipart
from app.api.schemas import ClassifyJSON
from app.errors import (
    BadRequest,
    InvalidParameter,
    PayloadTooLarge,
    UnsupportedMediaType,
    describe_validation_error,
)

RAW_TYPES = ("application/octet-stream",)
_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?)(?P<b64>;base64)?,", re.ASCII)
_WHITESPACE = re.compile(rb"\s+")


@dataclass(slots=True)
class ImageRequest:
    """The encoded images of one request, in order, and the options its body carried (None: not given)."""

    images: list[bytes]
    top_k: int | None = None
    logits: bool | None = None


async def read_images(request: Request, *, max_images: int) -> ImageRequest:
    content_type = request.headers.get("content-type", "application/octet-stream")
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type.startswith("image/") or media_type in RAW_TYPES:
        return ImageRequest(images=[await request.body()])
    if media_type == "multipart/form-data":
        return await _read_multipart(request, max_images)
    if media_type == "application/json":
        return _read_json(await request.body(), max_images)
    raise UnsupportedMediaType(
        f"content type {media_type!r} is not accepted; send an image with Content-Type: image/jpeg (or another "
        "image/* type), multipart/form-data, or application/json (curl: -H 'Content-Type: image/jpeg' "
        "--data-binary @cat.jpg)",
        code="unsupported_content_type",
    )


async def _read_multipart(request: Request, max_images: int) -> ImageRequest:
    result = ImageRequest(images=[])
    for part in await read_multipart(request, max_files=max_images):
        if part.filename is not None:
            result.images.append(bytes(part.data))
        elif part.name == "top_k":
            result.top_k = _form_int(part.name, part.text)
        elif part.name == "logits":
            result.logits = _form_bool(part.name, part.text)
        else:
            raise InvalidParameter(f"unknown form field {part.name!r}; send images as file parts")
    return result


def _read_json(body: bytes, max_images: int) -> ImageRequest:
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"malformed JSON: {exc}", code="invalid_json") from None
    try:
        payload = ClassifyJSON.model_validate(parsed)
    except ValidationError as exc:
        raise InvalidParameter(f"invalid JSON body: {describe_validation_error(exc)}", code="invalid_body") from None
    if len(payload.images) > max_images:  # before any base64 is decoded
        raise PayloadTooLarge(
            f"{len(payload.images)} images in one request; the limit is {max_images}", code="too_many_images"
        )
    images = [_decode_base64(index, text) for index, text in enumerate(payload.images)]
    return ImageRequest(images=images, top_k=payload.top_k, logits=payload.logits)


def _decode_base64(index: int, text: str) -> bytes:
    match = _DATA_URI.match(text)
    if match:
        media_type = (match["type"] or "text/plain").lower()
        if not media_type.startswith("image/") and media_type not in RAW_TYPES:
            raise UnsupportedMediaType(
                f"data: URI of type {media_type!r}; images must be image/*", code="unsupported_content_type"
            ).at(index)
        if not match["b64"]:
            raise BadRequest("data: URI must be base64-encoded (data:image/...;base64,...)", code="invalid_base64").at(
                index
            )
        text = text[match.end() :]
    try:
        # Allow line-wrapped base64 (what `base64 file` prints); reject anything else outside the alphabet.
        return base64.b64decode(_WHITESPACE.sub(b"", text.encode("ascii")), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise BadRequest("image is not valid base64", code="invalid_base64").at(index) from None


def _form_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidParameter(f"form field {name} must be an integer, not {value[:20]!r}") from None


def _form_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise InvalidParameter(f"form field {name} must be true or false, not {value[:20]!r}")
