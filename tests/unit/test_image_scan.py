"""Stage 1's gate: hostile structures refused from the header (generated here, a few KB each), photographs untouched."""

from __future__ import annotations

import io
import re
import struct
import zlib
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.errors import PayloadTooLarge
from app.http.error_status import status_of
from app.pipeline import image_scan
from app.pipeline.image_scan import ImageLimits, check_size, check_structure
from tests.support.photos import photo

DEFAULTS = ImageLimits()
PHOTOS = ("astronaut", "chelsea", "coffee")
SCAN = re.compile(rb"\xff\xda")


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def small(fmt: str, size: tuple[int, int] = (16, 12), **options: Any) -> bytes:
    return encode(Image.new("RGB", size, (10, 20, 30)), fmt, **options)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def refused(data: bytes, limits: ImageLimits = DEFAULTS) -> PayloadTooLarge:
    with pytest.raises(PayloadTooLarge) as caught:
        check_structure(data, limits)
    return caught.value


def photo_encodings() -> dict[str, bytes]:
    """scikit-image's photographs as a camera, a web page and a screenshot tool would write them."""
    encodings: dict[str, bytes] = {}
    for name in PHOTOS:
        image = Image.fromarray(photo(name))
        encodings[f"{name}-baseline"] = encode(image, "JPEG", quality=90)
        encodings[f"{name}-progressive"] = encode(image, "JPEG", quality=90, progressive=True)
        encodings[f"{name}-restart-markers"] = encode(image, "JPEG", quality=90, restart_marker_blocks=4)
        encodings[f"{name}-png"] = encode(image, "PNG")
    return encodings


PHOTO_ENCODINGS = photo_encodings()


# -- ordinary images pass, and are counted exactly ---------------------------------------------------------------


@pytest.mark.parametrize("data", list(PHOTO_ENCODINGS.values()), ids=list(PHOTO_ENCODINGS))
def test_photographs_pass_the_default_limits(data: bytes) -> None:
    check_structure(data, DEFAULTS)
    with Image.open(io.BytesIO(data)) as image:
        check_size(*image.size, DEFAULTS, resize_side=256)


@pytest.mark.parametrize("name", PHOTOS)
def test_scans_are_counted_exactly_past_stuffed_bytes_and_restart_markers(name: str) -> None:
    progressive = PHOTO_ENCODINGS[f"{name}-progressive"]
    scans = len(SCAN.findall(progressive))
    assert scans == 10  # libjpeg's default progression for a colour picture
    check_structure(progressive, ImageLimits(max_jpeg_scans=scans))
    assert refused(progressive, ImageLimits(max_jpeg_scans=scans - 1)).code == "image_too_many_scans"
    restarts = PHOTO_ENCODINGS[f"{name}-restart-markers"]
    assert b"\xff\xd0" in restarts and b"\xff\x00" in restarts  # the entropy-coded data holds both
    check_structure(restarts, ImageLimits(max_jpeg_scans=1))


@pytest.mark.parametrize("window", [1, 2, 7, 4096])
def test_markers_are_found_across_search_windows(monkeypatch: pytest.MonkeyPatch, window: int) -> None:
    """The entropy-coded data is searched a window at a time; a marker split by a window's end is still found."""
    monkeypatch.setattr(image_scan, "_SEARCH_WINDOW", window)
    progressive = PHOTO_ENCODINGS["chelsea-progressive"]
    check_structure(progressive, ImageLimits(max_jpeg_scans=10, max_jpeg_segments=14))
    assert refused(progressive, ImageLimits(max_jpeg_scans=9)).code == "image_too_many_scans"
    assert refused(progressive, ImageLimits(max_jpeg_segments=13)).code == "image_too_many_segments"


def test_a_phone_sized_photo_passes() -> None:
    check_size(4000, 3000, DEFAULTS, resize_side=256)
    check_size(3000, 4000, DEFAULTS, resize_side=518)


def test_a_panorama_and_a_long_screenshot_pass() -> None:
    check_size(12000, 1500, DEFAULTS, resize_side=256)  # 1:8
    check_size(1080, 30000, DEFAULTS, resize_side=256)  # 1:28


def test_other_formats_are_left_to_the_decoder() -> None:
    for fmt in ("WEBP", "BMP", "TIFF"):
        check_structure(small(fmt), ImageLimits(max_jpeg_scans=1, max_jpeg_segments=1, max_image_chunks=1))


def test_malformed_structure_is_left_to_the_decoder() -> None:
    jpeg, png = small("JPEG"), small("PNG")
    for data in (jpeg[:3], jpeg[:40], jpeg[:-2], b"\xff\xd8\xff\xe0\x00\x01", png[:10], png[:40]):
        check_structure(data, DEFAULTS)


# -- hostile structures: refused, each with its code ------------------------------------------------------------


def jpeg_with_scans(count: int) -> bytes:
    """A 16x12 progressive JPEG whose last scan is repeated until there are `count` (a few bytes each)."""
    data = small("JPEG", progressive=True)
    starts = [match.start() for match in SCAN.finditer(data)]
    last = data[starts[-1] : -2]  # the last scan, up to EOI
    return data[: starts[-1]] + last * (count - len(starts) + 1) + data[-2:]


def test_a_jpeg_with_3000_scans_is_refused() -> None:
    data = jpeg_with_scans(3000)
    assert len(SCAN.findall(data)) == 3000 and len(data) < 64_000
    error = refused(data)
    assert (status_of(error), error.code) == (413, "image_too_many_scans")
    assert "more than 100 scans" in error.message


@pytest.mark.parametrize(
    "segment",
    [
        b"\xff\xfe" + struct.pack(">H", 10) + b"comment!",
        b"\xff\xe1" + struct.pack(">H", 12) + b"Exif\x00\x00MM\x00*",
        b"\xff\xe2" + struct.pack(">H", 16) + b"ICC_PROFILE\x00\x01\x01",
        b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes(range(1, 65)),  # DQT
    ],
    ids=["COM", "APP1-Exif", "APP2-ICC", "DQT"],
)
def test_a_jpeg_with_500_segments_is_refused(segment: bytes) -> None:
    jpeg = small("JPEG")
    data = jpeg[:2] + segment * 500 + jpeg[2:]
    error = refused(data)
    assert (status_of(error), error.code) == (413, "image_too_many_segments")
    assert "more than 256 marker segments" in error.message


def test_jpeg_metadata_is_bounded_in_bytes() -> None:
    jpeg = small("JPEG")
    comment = b"\xff\xfe" + struct.pack(">H", 65535) + b"c" * 65533
    data = jpeg[:2] + comment * 20 + jpeg[2:]  # 1.3 MB
    check_structure(data, DEFAULTS)
    error = refused(data, ImageLimits(max_metadata_bytes=1 << 20))
    assert (status_of(error), error.code) == (413, "image_too_much_metadata")


def png_with_chunks(count: int, kind: bytes = b"tEXt", body: bytes = b"k\x00v") -> bytes:
    png = small("PNG")
    return png[:33] + png_chunk(kind, body) * count + png[33:]  # after the signature and IHDR


def test_a_png_with_300_000_chunks_is_refused() -> None:
    data = png_with_chunks(300_000, b"abCd", b"")
    error = refused(data)
    assert (status_of(error), error.code) == (413, "image_too_many_chunks")
    assert "more than 10000 chunks" in error.message


def test_the_png_walk_stops_at_the_limit() -> None:
    """Past the limit, the walk reads nothing more: the rest of the file may be anything."""
    data = png_with_chunks(20, b"abCd", b"")
    cut = 8 + 25 + 12 * 5  # signature, IHDR, five empty chunks; then not a chunk at all
    error = refused(data[:cut] + b"\xff" * 64, ImageLimits(max_image_chunks=6))
    assert error.code == "image_too_many_chunks"


def test_png_text_and_profiles_are_bounded_in_bytes() -> None:
    data = png_with_chunks(3, b"zTXt", b"k\x00\x00" + zlib.compress(np.random.default_rng(0).bytes(400_000)))
    check_structure(data, DEFAULTS)
    assert refused(data, ImageLimits(max_metadata_bytes=1 << 20)).code == "image_too_much_metadata"


def test_pixel_data_split_into_many_chunks_is_not_metadata() -> None:
    """Encoders write pixel data in IDAT chunks of 8 KB and more: 8,000 of them stay under the default."""
    data = png_with_chunks(8000, b"IDAT", b"")
    check_structure(data, DEFAULTS)


def gif_with_comments(count: int, *, palette: bool = True) -> bytes:
    """A GIF with `count` empty comment extensions (3 bytes, one block each) before its first frame."""
    frames = [Image.new("P", (8, 6), 1), Image.new("P", (8, 6), 2)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], loop=0, duration=50, comment=b"hello")
    header = 13 + (3 << ((data[10] & 0x07) + 1))  # PIL always writes a global palette
    if not palette:  # the same GIF, the global palette moved into the first frame's descriptor
        colours, flags = data[13:header], data[10]
        frame = data.index(b"\x2c", header)
        descriptor = data[frame : frame + 9] + bytes([0x80 | (flags & 0x07)]) + colours
        data = data[:10] + bytes([flags & 0x7F]) + data[11:13] + data[header:frame] + descriptor + data[frame + 10 :]
        header = 13
    return data[:header] + b"\x21\xfe\x00" * count + data[header:]


@pytest.mark.parametrize("palette", [True, False], ids=["global-palette", "no-global-palette"])
def test_gif_blocks_before_the_first_frame_are_counted_exactly(palette: bool) -> None:
    plain = gif_with_comments(0, palette=palette)
    with Image.open(io.BytesIO(gif_with_comments(5, palette=palette))) as opened:
        opened.load()  # PIL reads it: the comments are real blocks
    base = next(n for n in range(1, 64) if _passes(plain, ImageLimits(max_image_chunks=n)))
    data = gif_with_comments(100, palette=palette)
    check_structure(data, ImageLimits(max_image_chunks=base + 100))
    error = refused(data, ImageLimits(max_image_chunks=base + 99))
    assert (error.code, status_of(error)) == ("image_too_many_chunks", 413)


def test_a_gif_with_a_million_blocks_before_its_first_frame_is_refused() -> None:
    error = refused(gif_with_comments(1_000_000))
    assert error.code == "image_too_many_chunks" and "10000 blocks before its first frame" in error.message


def _passes(data: bytes, limits: ImageLimits) -> bool:
    try:
        check_structure(data, limits)
    except PayloadTooLarge:
        return False
    return True


# -- sizes: the input's, its aspect ratio, and what the resize would produce --------------------------------------


def test_a_png_1_pixel_wide_and_60000_tall_is_refused_by_its_aspect_ratio() -> None:
    data = png_of_size(1, 60_000)
    assert len(data) < 1024
    check_structure(data, DEFAULTS)
    with Image.open(io.BytesIO(data)) as image:
        assert image.size == (1, 60_000)
        with pytest.raises(PayloadTooLarge) as caught:
            check_size(*image.size, DEFAULTS, resize_side=256)
    assert (caught.value.code, status_of(caught.value)) == ("image_aspect_ratio", 413)
    assert "1:60000.0" in caught.value.message and "1:64" in caught.value.message


def test_what_the_resize_would_produce_is_bounded() -> None:
    """1x60000 is 60,000 pixels sent, and 256 x 15,360,000 (3.9 G) once its short side is resized to 256."""
    lenient = ImageLimits(max_aspect_ratio=1e9)
    with pytest.raises(PayloadTooLarge) as caught:
        check_size(1, 60_000, lenient, resize_side=256)
    assert caught.value.code == "image_output_too_large"
    assert "3932160000 pixels" in caught.value.message
    check_size(1, 60_000, lenient)  # no resize: only the input is bounded
    check_size(500, 60_000, lenient, resize_side=256)  # 256 x 30,720: 7.9 M pixels


def test_the_input_pixel_limit_still_holds() -> None:
    with pytest.raises(PayloadTooLarge) as caught:
        check_size(8000, 6000, DEFAULTS)
    assert caught.value.code == "image_too_large"


def png_of_size(width: int, height: int) -> bytes:
    """A valid PNG of any size in a few hundred bytes: every row is the same zero bytes, compressed."""
    rows = (b"\x00" + b"\x00" * 3 * width) * height
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )
