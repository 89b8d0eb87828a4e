"""Stage 1's gate: an image's cost bounded from its header, before any pixel is decoded.

Pixels are not the only cost of a decode. A progressive JPEG pays a pass over the whole picture for every scan; PIL
parses each JPEG marker segment, PNG chunk and GIF block in Python (and appends repeated Exif segments to one another,
so their cost grows with the square of their count); the resize to the model's short side turns a 1-pixel-wide image
into hundreds of megapixels. `check_structure` walks a JPEG's segments, a PNG's chunks or a GIF's blocks without
decoding anything (linear in the input, stopping at the first limit passed); `check_size` bounds the aspect ratio and
the size the resize will produce, from the header's width and height. Each refusal is a 413 with its own code.
"""

from __future__ import annotations

import math
import re
import struct
import sys
from dataclasses import dataclass

from app.errors import PayloadTooLarge

JPEG_START = b"\xff\xd8"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
# A marker: 0xFF, then anything but a stuffed zero, a restart marker (both inside entropy-coded data) or a fill byte.
# Searching for it skips a scan's entropy-coded data, fill bytes and garbage between segments, as libjpeg does.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_SEARCH_WINDOW = 1 << 20  # bytes a search reads at once, holding the GIL (about 5 ms): the event loop never waits long
_JPEG_END, _JPEG_SCAN = 0xD9, 0xDA
_JPEG_STANDALONE = frozenset({0x01, 0xD8})  # TEM and SOI carry no length (RSTn are never matched)
_PNG_METADATA = frozenset({b"tEXt", b"zTXt", b"iTXt", b"iCCP", b"eXIf"})


@dataclass(frozen=True, slots=True)
class ImageLimits:
    """What one image may cost: the settings max_image_pixels, max_image_aspect_ratio, max_jpeg_scans,
    max_jpeg_segments, max_image_chunks and max_image_metadata_bytes, in that order."""

    max_pixels: int = 40_000_000
    max_aspect_ratio: float = 64.0
    max_jpeg_scans: int = 100
    max_jpeg_segments: int = 256
    max_image_chunks: int = 10_000
    max_metadata_bytes: int = 16 * 2**20


NO_LIMITS = ImageLimits(  # for an image already checked
    max_pixels=sys.maxsize,
    max_aspect_ratio=math.inf,
    max_jpeg_scans=sys.maxsize,
    max_jpeg_segments=sys.maxsize,
    max_image_chunks=sys.maxsize,
    max_metadata_bytes=sys.maxsize,
)


def check_structure(data: bytes, limits: ImageLimits) -> None:
    """Refuse a JPEG, PNG or GIF whose structure costs more than `limits` allow; other formats pass.

    Malformed structure is not refused here: the decoder says what is wrong with it.
    """
    if data.startswith(JPEG_START):
        _check_jpeg(data, limits)
    elif data.startswith(PNG_SIGNATURE):
        _check_png(data, limits)
    elif data.startswith(GIF_SIGNATURES):
        _check_gif(data, limits)


def check_size(width: int, height: int, limits: ImageLimits, *, resize_side: int | None = None) -> None:
    """Refuse an image over `max_pixels`, more elongated than `max_aspect_ratio`, or that becomes larger than
    `max_pixels` once its short side is resized to `resize_side` (torchvision's resize: the long side scaled alike)."""
    if width * height > limits.max_pixels:
        raise PayloadTooLarge(
            f"image ({width}x{height}) is over the limit of {limits.max_pixels} pixels", code="image_too_large"
        )
    short, long = sorted((width, height))
    if short == 0:
        return  # no pixels: the decoder refuses it
    if long > short * limits.max_aspect_ratio:
        raise PayloadTooLarge(
            f"image ({width}x{height}) has an aspect ratio of 1:{long / short:.1f}; "
            f"the limit is 1:{limits.max_aspect_ratio:g}",
            code="image_aspect_ratio",
        )
    if resize_side is None:
        return
    resized = resize_side * math.floor(resize_side * long / short)
    if resized > limits.max_pixels:
        raise PayloadTooLarge(
            f"image ({width}x{height}) would be resized to {resized} pixels (short side {resize_side}); "
            f"the limit is {limits.max_pixels} pixels",
            code="image_output_too_large",
        )


def _check_jpeg(data: bytes, limits: ImageLimits) -> None:
    """Walk the marker segments from SOI to the first EOI, jumping over each segment by its length and over each
    scan's entropy-coded data by searching for the next marker (linear in the input: one regex pass, in windows)."""
    scans = segments = metadata = 0
    position = len(JPEG_START)
    while (start := _next_marker(data, position)) >= 0:
        marker = data[start + 1]
        if marker == _JPEG_END:
            return  # what follows (an MPO's other pictures) is never decoded
        if marker in _JPEG_STANDALONE:
            position = start + 2
            continue
        if start + 4 > len(data):
            return
        (length,) = struct.unpack_from(">H", data, start + 2)
        if length < 2:
            return
        position = start + 2 + length
        if marker == _JPEG_SCAN:
            scans += 1
            if scans > limits.max_jpeg_scans:
                raise PayloadTooLarge(f"JPEG has more than {limits.max_jpeg_scans} scans", code="image_too_many_scans")
            continue
        segments += 1
        if segments > limits.max_jpeg_segments:
            raise PayloadTooLarge(
                f"JPEG has more than {limits.max_jpeg_segments} marker segments", code="image_too_many_segments"
            )
        if 0xE0 <= marker <= 0xEF or marker == 0xFE:  # APPn (Exif, XMP, ICC, ...) and COM
            metadata += length - 2
            if metadata > limits.max_metadata_bytes:
                raise _too_much_metadata("JPEG", limits)


def _next_marker(data: bytes, position: int) -> int:
    """Where the next marker starts, or -1: one window at a time (a match may end one byte past its window)."""
    while position < len(data) - 1:
        if match := _JPEG_MARKER.search(data, position, position + _SEARCH_WINDOW + 1):
            return match.start()
        position += _SEARCH_WINDOW
    return -1


def _check_png(data: bytes, limits: ImageLimits) -> None:
    """Walk the chunk headers from the signature to IEND: a length, a type, then a jump past the data and CRC."""
    chunks = metadata = 0
    position = len(PNG_SIGNATURE)
    while position + 8 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, position)
        chunks += 1
        if chunks > limits.max_image_chunks:
            raise PayloadTooLarge(f"PNG has more than {limits.max_image_chunks} chunks", code="image_too_many_chunks")
        if kind in _PNG_METADATA:
            metadata += length
            if metadata > limits.max_metadata_bytes:
                raise _too_much_metadata("PNG", limits)
        if kind == b"IEND":
            return
        position += 12 + length  # length, type, data, CRC


def _check_gif(data: bytes, limits: ImageLimits) -> None:
    """Walk the extension blocks before the first frame, which PIL reads in Python one sub-block at a time (the
    frame's own data goes to the C decoder): each extension's sub-blocks, up to the first image descriptor."""
    flags = data[10] if len(data) > 10 else 0
    position = 13 + ((3 << ((flags & 0x07) + 1)) if flags & 0x80 else 0)  # the header, the global palette
    blocks = 0
    while position < len(data) and data[position] == 0x21:  # an extension; 0x2C starts the first frame
        position += 2  # introducer and label
        size = -1
        while size != 0 and position < len(data):  # sub-blocks: a length byte, then that many bytes; 0 ends them
            size = data[position]
            position += 1 + size
            blocks += 1
            if blocks > limits.max_image_chunks:
                raise PayloadTooLarge(
                    f"GIF has more than {limits.max_image_chunks} blocks before its first frame",
                    code="image_too_many_chunks",
                )


def _too_much_metadata(kind: str, limits: ImageLimits) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"{kind} carries more than {limits.max_metadata_bytes} bytes of metadata", code="image_too_much_metadata"
    )
