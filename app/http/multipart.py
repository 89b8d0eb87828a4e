"""multipart/form-data, parsed in memory as it streams in (python-multipart's parser).

Not Starlette's `request.form()`: that spools every file part over 1 MiB to a temporary file on disk, and uploaded
images must never touch the disk. Memory stays bounded by the body limit, which counts bytes as they arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from app.errors import BadRequest, PayloadTooLarge

MAX_FIELDS = 16  # text fields (options); more is not a request this service understands
MAX_FIELD_BYTES = 1024
MAX_HEADER_BYTES = 8 * 1024


@dataclass(slots=True)
class Part:
    name: str
    filename: str | None  # None: a text field
    data: bytearray = field(default_factory=bytearray)

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class _Collector:
    """python-multipart's callbacks: headers and data of each part, with the part limits checked as they arrive."""

    def __init__(self, max_files: int) -> None:
        self.max_files = max_files
        self.parts: list[Part] = []
        self.ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers_size = 0
        self._disposition = b""
        self._current: Part | None = None
        self._files = 0
        self._fields = 0

    def on_part_begin(self) -> None:
        self._disposition = b""
        self._headers_size = 0

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._grow_headers(end - start)
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._grow_headers(end - start)
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if bytes(self._header_name).lower() == b"content-disposition":
            self._disposition = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._disposition)
        if disposition != b"form-data" or b"name" not in options:
            raise BadRequest(
                'every part needs a header Content-Disposition: form-data; name="..."', code="invalid_multipart"
            )
        name = options[b"name"].decode("utf-8", errors="replace")
        filename = options[b"filename"].decode("utf-8", errors="replace") if b"filename" in options else None
        if filename is not None:
            self._files += 1
            if self._files > self.max_files:
                raise PayloadTooLarge(
                    f"more than {self.max_files} images in one request; the limit is {self.max_files}",
                    code="too_many_images",
                )
        else:
            self._fields += 1
            if self._fields > MAX_FIELDS:
                raise BadRequest(f"more than {MAX_FIELDS} text fields", code="invalid_multipart")
        self._current = Part(name, filename)
        self.parts.append(self._current)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        assert self._current is not None  # the parser calls on_headers_finished first
        self._current.data += data[start:end]
        if self._current.filename is None and len(self._current.data) > MAX_FIELD_BYTES:
            raise BadRequest(
                f"text field {self._current.name!r} is over {MAX_FIELD_BYTES} bytes", code="invalid_multipart"
            )

    def on_part_end(self) -> None:
        self._current = None

    def on_end(self) -> None:
        self.ended = True

    def _grow_headers(self, size: int) -> None:
        self._headers_size += size
        if self._headers_size > MAX_HEADER_BYTES:
            raise BadRequest(f"a part's headers are over {MAX_HEADER_BYTES} bytes", code="invalid_multipart")


async def read_multipart(request: Request, *, max_files: int) -> list[Part]:
    """Every part of a multipart/form-data body, in order. Malformed bodies are 400 `invalid_multipart`."""
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary parameter", code="invalid_multipart")
    collector = _Collector(max_files)
    try:
        parser = MultipartParser(
            boundary,
            {
                "on_part_begin": collector.on_part_begin,
                "on_part_data": collector.on_part_data,
                "on_part_end": collector.on_part_end,
                "on_header_field": collector.on_header_field,
                "on_header_value": collector.on_header_value,
                "on_header_end": collector.on_header_end,
                "on_headers_finished": collector.on_headers_finished,
                "on_end": collector.on_end,
            },
        )
        async for chunk in request.stream():
            parser.write(chunk)
            if collector.ended:
                break
        parser.finalize()
    except FormParserError as exc:
        raise BadRequest(f"malformed multipart body: {exc}", code="invalid_multipart") from None
    if not collector.ended:
        raise BadRequest("multipart body ends before its closing boundary", code="invalid_multipart")
    return collector.parts
