"""Reading an image request (classify, embed, explain): a raw image, multipart files, or JSON with base64 images ->
encoded image bytes and the endpoint's options."""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from app.errors import (
    BadRequest,
    InvalidParameter,
    PayloadTooLarge,
    UnsupportedMediaType,
    describe_validation_error,
)
from app.http.multipart import read_multipart
from app.http.schemas import ImagesJSON
from app.protocols.json_bounds import check_json_bounds, parse_json
from app.protocols.off_loop import parse_off_loop

RAW_TYPES = ("application/octet-stream",)
_DATA_URI = re.compile(r"data:(?P<type>[\w.+-]+/[\w.+-]+)?(?P<params>(;[^,;]*)*?)(?P<b64>;base64)?,", re.ASCII)
_WHITESPACE = re.compile(rb"\s+")
JSON_CONTAINERS = 64  # the object and its images array, and room for options; more is no request of this API


Options = TypeVar("Options", bound=BaseModel)


@dataclass(slots=True)
class ImageRequest(Generic[Options]):
    """The encoded images of one request, in order, and its options: the body's (JSON keys or multipart text fields)
    over the query string's."""

    images: list[bytes]
    options: Options


async def read_images(request: Request, *, max_images: int, options: type[Options]) -> ImageRequest[Options]:
    """The images and options of an image request; `options` is the endpoint's options model (unknown ones: 422)."""
    query = dict(request.query_params)
    _check_known(options, query, "query parameter", "invalid_parameter")
    try:  # the query string alone first: a bad value there is refused whatever the body says, before it is read
        options.model_validate(query)
    except ValidationError as exc:
        raise InvalidParameter(f"query {describe_validation_error(exc)}") from None
    content_type = request.headers.get("content-type", "application/octet-stream")
    media_type = content_type.split(";", 1)[0].strip().lower()
    fields: dict[str, Any] = {}
    code = "invalid_parameter"
    if media_type.startswith("image/") or media_type in RAW_TYPES:
        images = [await request.body()]
    elif media_type == "multipart/form-data":
        images, fields = await _read_multipart(request, max_images)
        _check_known(options, fields, "form field", code)
    elif media_type == "application/json":
        body = await request.body()
        images, fields = await parse_off_loop(len(body), _read_json, body, max_images)
        _check_known(options, fields, "JSON key", "invalid_body")
        code = "invalid_body"
    else:
        raise UnsupportedMediaType(
            f"content type {media_type!r} is not accepted; send an image with Content-Type: image/jpeg (or another "
            "image/* type), multipart/form-data, or application/json (curl: -H 'Content-Type: image/jpeg' "
            "--data-binary @cat.jpg)",
            code="unsupported_content_type",
        )
    try:
        parsed = options.model_validate({**query, **fields})
    except ValidationError as exc:
        raise InvalidParameter(f"invalid options: {describe_validation_error(exc)}", code=code) from None
    return ImageRequest(images=images, options=parsed)


def _check_known(options: type[BaseModel], given: dict[str, Any], kind: str, code: str) -> None:
    """A misspelt option silently ignored would be a wrong answer the client cannot see."""
    unknown = sorted(set(given) - set(options.model_fields))
    if unknown:
        known = ", ".join(options.model_fields)
        raise InvalidParameter(f"unknown {kind} {unknown[0]!r}; the options are {known}", code=code)


async def _read_multipart(request: Request, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    """File parts are the images, in order; text fields are options."""
    images: list[bytes] = []
    fields: dict[str, Any] = {}
    for part in await read_multipart(request, max_files=max_images):
        if part.filename is not None:
            images.append(bytes(part.data))
        else:
            fields[part.name] = part.text
    return images, fields


def _read_json(body: bytes, max_images: int) -> tuple[list[bytes], dict[str, Any]]:
    """`{"images": [base64 or data: URI, ...], <options>}`."""
    counts = check_json_bounds(body, max_containers=JSON_CONTAINERS, max_values=2**62)
    if counts.values > max_images + JSON_CONTAINERS:  # before anything is parsed: many images are many values
        raise _too_many_images(max_images, f"more than {max_images}")
    parsed = parse_json(body)
    try:
        payload = ImagesJSON.model_validate(parsed)
    except ValidationError as exc:
        raise InvalidParameter(f"invalid JSON body: {describe_validation_error(exc)}", code="invalid_body") from None
    if len(payload.images) > max_images:  # before any base64 is decoded
        raise _too_many_images(max_images, str(len(payload.images)))
    images = [_decode_base64(index, text) for index, text in enumerate(payload.images)]
    return images, dict(payload.model_extra or {})


def _too_many_images(max_images: int, count: str) -> PayloadTooLarge:
    return PayloadTooLarge(f"{count} images in one request; the limit is {max_images}", code="too_many_images")


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
