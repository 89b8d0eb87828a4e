"""Property-based tests of the decoder (hypothesis): whatever the bytes, a picture or a 4xx, never anything else."""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from app.errors import ServeError
from app.http.error_status import status_of
from app.pipeline.decode import ACCEPTED_FORMATS, decode
from app.pipeline.image_scan import ImageLimits

MAX_PIXELS = 1_000_000
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FORMATS = list(ACCEPTED_FORMATS)
MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16"]
SAVES = {  # which modes each format can write
    "JPEG": {"RGB", "L", "CMYK"},
    "PNG": {"RGB", "RGBA", "L", "LA", "P", "1", "I;16"},
    "WEBP": {"RGB", "RGBA"},
    "BMP": {"RGB", "L", "P", "1"},
    "GIF": {"L", "P", "1"},
    "TIFF": {"RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16"},
}


def outcome(data: bytes) -> tuple[int, int] | int:
    """The decoded size, or the 4xx status; any other exception fails the property."""
    try:
        image = decode(data, limits=ImageLimits(max_pixels=MAX_PIXELS))
    except ServeError as exc:
        assert 400 <= status_of(exc) < 500, exc
        assert exc.message and "Traceback" not in exc.message
        return status_of(exc)
    assert image.mode == "RGB"
    assert image.width * image.height <= MAX_PIXELS
    return image.size


@st.composite
def images(draw: st.DrawFn) -> tuple[bytes, tuple[int, int]]:
    fmt = draw(st.sampled_from(FORMATS))
    mode = draw(st.sampled_from(sorted(SAVES[fmt])))
    width, height = draw(st.integers(1, 96)), draw(st.integers(1, 96))
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image = Image.fromarray(pixels, "RGBA")
    if mode == "I;16":
        image = Image.fromarray(pixels[..., 0].astype(np.uint16) * 257)  # 16-bit grey: mode I;16
    elif mode == "P":
        image = image.convert("RGB").quantize(colors=draw(st.integers(2, 256)))
    else:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue(), (width, height)


@FAST
@given(st.binary(max_size=4096))
def test_arbitrary_bytes_are_a_picture_or_a_4xx(data: bytes) -> None:
    outcome(data)


@FAST
@given(
    st.binary(min_size=1, max_size=512),
    st.sampled_from([b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF89a", b"BM", b"II*\x00", b"RIFF"]),
)
def test_bytes_behind_a_real_magic_number_are_a_picture_or_a_4xx(tail: bytes, magic: bytes) -> None:
    outcome(magic + tail)


@FAST
@given(images())
def test_every_valid_image_decodes_to_rgb_at_its_size_or_is_refused_by_shape(
    case: tuple[bytes, tuple[int, int]],
) -> None:
    data, size = case
    within_aspect_ratio = max(size) <= ImageLimits().max_aspect_ratio * min(size)
    assert outcome(data) == (size if within_aspect_ratio else 413)


@FAST
@given(images(), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=16))
def test_a_corrupted_valid_image_is_a_picture_or_a_4xx(
    case: tuple[bytes, tuple[int, int]], edits: list[tuple[float, int]]
) -> None:
    data = bytearray(case[0])
    for where, value in edits:
        data[int(where * len(data))] = value
    outcome(bytes(data))


@FAST
@given(images(), st.floats(0, 1, exclude_max=True))
def test_a_truncated_valid_image_is_a_picture_or_a_4xx(case: tuple[bytes, tuple[int, int]], keep: float) -> None:
    data = case[0]
    outcome(data[: int(keep * len(data))])
