"""Stage 1 (decode) and stage 2 (preprocess): every test image is generated here, with PIL and numpy."""

from __future__ import annotations

import functools
import io
import struct
import warnings
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import skimage.data
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps
from torchvision.models import ViT_B_16_Weights

from app.config.settings import Settings
from app.errors import BadRequest, InvalidImage, PayloadTooLarge, ServeError, UnsupportedMediaType
from app.http.error_status import status_of
from app.pipeline.decode import decode
from app.pipeline.image_scan import ImageLimits
from app.pipeline.preprocess import PreprocessParams, build_preprocessor, preset_params

MAX_PIXELS = 1_000_000
LIMITS = ImageLimits(max_pixels=MAX_PIXELS)
LARGE = ImageLimits(max_pixels=10**8)
DEFAULT_MAX_PIXELS: int = Settings.model_fields["max_image_pixels"].default
WIDTH, HEIGHT = 48, 40  # non-square, so a swapped width and height shows


# --- builders -------------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def gradient(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    """An (h, w, 3) uint8 picture where every row and column differs: a flip, a transpose or a crop shows."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x * 7 + y * 13) % 256], axis=-1)


def gradient_image(width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    return Image.fromarray(gradient(width, height).astype(np.uint8))


def four_colour_image() -> Image.Image:
    """Four solid quadrants: few enough colours for GIF's palette, so every lossless format is exact."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pixels[: HEIGHT // 2, : WIDTH // 2] = (255, 0, 0)
    pixels[HEIGHT // 2 :, : WIDTH // 2] = (0, 255, 0)
    pixels[: HEIGHT // 2, WIDTH // 2 :] = (0, 0, 255)
    pixels[HEIGHT // 2 :, WIDTH // 2 :] = (250, 250, 10)
    return Image.fromarray(pixels)


def reference(data: bytes) -> np.ndarray:
    """What PIL itself makes of the bytes: opened, EXIF orientation applied, converted to RGB."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))


def opened_mode(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as image:
        return image.mode


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR (8-bit RGB) declaring any size, with a tiny IDAT: a few dozen bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 16))
        + png_chunk(b"IEND", b"")
    )


def as_array(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


@functools.cache
def photo(name: str) -> Image.Image:
    """A real photograph from scikit-image: "chelsea" (451x300), "astronaut" (512x512), "coffee" (600x400)."""
    load: Callable[[], np.ndarray] = getattr(skimage.data, name)
    return Image.fromarray(load())


@pytest.fixture(scope="module")
def chelsea_jpeg() -> bytes:
    return encode(photo("chelsea"), "JPEG", quality=90)


# --- formats --------------------------------------------------------------------------------------------------

FORMAT_CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("JPEG", {"quality": 95, "subsampling": 0}, False),
    ("PNG", {}, True),
    ("WEBP", {"lossless": True}, True),
    ("BMP", {}, True),
    ("GIF", {}, True),
    ("TIFF", {}, True),
    ("TIFF", {"compression": "tiff_lzw"}, True),
]
FORMAT_IDS = ["jpeg", "png", "webp-lossless", "bmp", "gif", "tiff", "tiff-lzw"]


@pytest.mark.parametrize(("fmt", "options", "lossless"), FORMAT_CASES, ids=FORMAT_IDS)
def test_every_accepted_format_decodes_to_rgb(fmt: str, options: dict[str, Any], lossless: bool) -> None:
    source = four_colour_image()
    data = encode(source, fmt, **options)

    image = decode(data, limits=LIMITS)

    assert image.mode == "RGB"
    assert image.size == (WIDTH, HEIGHT)
    assert np.array_equal(as_array(image), reference(data))
    if lossless:
        assert np.array_equal(as_array(image), as_array(source))
    else:  # lossy: the same picture, within JPEG's error
        difference = np.abs(as_array(image).astype(int) - as_array(source).astype(int))
        assert difference.mean() < 3


def test_lossy_webp_decodes_to_rgb() -> None:
    data = encode(gradient_image(), "WEBP", quality=90)

    image = decode(data, limits=LIMITS)

    assert (image.mode, image.size) == ("RGB", (WIDTH, HEIGHT))
    assert np.array_equal(as_array(image), reference(data))


# --- modes ----------------------------------------------------------------------------------------------------


def grey(width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
    return gradient(width, height)[..., 0].astype(np.uint8)


def mode_1() -> Image.Image:
    return Image.fromarray(grey() > 128)


def mode_l() -> Image.Image:
    return Image.fromarray(grey())


def mode_la() -> Image.Image:
    return Image.merge("LA", (mode_l(), Image.fromarray(gradient()[..., 1].astype(np.uint8))))


def mode_rgba() -> Image.Image:
    alpha = Image.fromarray(gradient()[..., 2].astype(np.uint8))
    return Image.merge("RGBA", (*gradient_image().split(), alpha))


def mode_p() -> Image.Image:
    return gradient_image().quantize(colors=16)


def mode_i16() -> Image.Image:
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    return Image.fromarray(((x * HEIGHT + y) * 34).astype(np.uint16))  # 0 .. ~65k: over 255 as well as under


def mode_cmyk() -> Image.Image:
    channels = np.concatenate([gradient(), grey()[..., None] // 2], axis=-1).astype(np.uint8)
    return Image.frombytes("CMYK", (WIDTH, HEIGHT), channels.tobytes())


MODE_CASES: list[tuple[str, Callable[[], Image.Image], str, dict[str, Any], str]] = [
    ("1-png", mode_1, "PNG", {}, "1"),
    ("1-bmp", mode_1, "BMP", {}, "1"),
    ("1-tiff", mode_1, "TIFF", {}, "1"),
    ("L-png", mode_l, "PNG", {}, "L"),
    ("L-jpeg", mode_l, "JPEG", {}, "L"),
    ("LA-png", mode_la, "PNG", {}, "LA"),
    ("LA-tiff", mode_la, "TIFF", {}, "LA"),
    ("RGBA-png", mode_rgba, "PNG", {}, "RGBA"),
    ("RGBA-webp", mode_rgba, "WEBP", {"lossless": True}, "RGBA"),
    ("RGBA-tiff", mode_rgba, "TIFF", {}, "RGBA"),
    ("P-png", mode_p, "PNG", {}, "P"),
    ("P-png-transparency-index", mode_p, "PNG", {"transparency": 3}, "P"),
    ("P-gif", mode_p, "GIF", {}, "P"),
    ("P-gif-transparency-index", mode_p, "GIF", {"transparency": 3}, "P"),
    ("I;16-png", mode_i16, "PNG", {}, "I;16"),
    ("CMYK-jpeg", mode_cmyk, "JPEG", {"quality": 95}, "CMYK"),
    ("CMYK-tiff", mode_cmyk, "TIFF", {}, "CMYK"),
]


@pytest.mark.parametrize(
    ("build", "fmt", "options", "stored_mode"), [case[1:] for case in MODE_CASES], ids=[case[0] for case in MODE_CASES]
)
def test_every_mode_comes_back_rgb_as_pil_converts_it(
    build: Callable[[], Image.Image], fmt: str, options: dict[str, Any], stored_mode: str
) -> None:
    data = encode(build(), fmt, **options)
    assert opened_mode(data) == stored_mode  # the case really exercises that mode

    image = decode(data, limits=LIMITS)

    assert image.mode == "RGB"
    assert image.size == (WIDTH, HEIGHT)
    assert np.array_equal(as_array(image), reference(data))


def test_transparent_pixels_keep_their_colour_not_black() -> None:
    """RGBA -> RGB drops alpha; it does not premultiply (what torchvision's preset would be given anyway)."""
    data = encode(Image.new("RGBA", (4, 4), (200, 100, 50, 0)), "PNG")

    assert decode(data, limits=LIMITS).getpixel((0, 0)) == (200, 100, 50)


def test_palette_png_with_per_entry_alpha_decodes_without_warning() -> None:
    """A palette PNG whose tRNS gives several entries alpha (pngquant's output, common on the web)."""
    data = encode(mode_p(), "PNG", transparency=bytes([0, 128, 255, 64]))
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "P"
        assert isinstance(opened.info["transparency"], bytes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference(data)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        image = decode(data, limits=LIMITS)

    assert (image.mode, image.size) == ("RGB", (WIDTH, HEIGHT))
    assert np.array_equal(as_array(image), expected)
    assert [str(w.message) for w in caught] == []


# --- EXIF orientation -----------------------------------------------------------------------------------------


def orientation_exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    return exif


def jpeg_with_orientation(orientation: int) -> bytes:
    return encode(gradient_image(), "JPEG", quality=95, exif=orientation_exif(orientation).tobytes())


def test_exif_orientation_6_rotates_a_jpeg_upright() -> None:
    data = jpeg_with_orientation(6)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.getexif()[ExifTags.Base.Orientation] == 6
        assert raw.size == (WIDTH, HEIGHT)
        stored = np.asarray(raw.convert("RGB"))

    image = decode(data, limits=LIMITS)

    assert image.mode == "RGB"
    assert image.size == (HEIGHT, WIDTH)  # swapped
    assert np.array_equal(as_array(image), reference(data))
    assert np.array_equal(as_array(image), np.rot90(stored, k=-1))  # 6: the camera was turned 90° clockwise


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied(orientation: int) -> None:
    data = jpeg_with_orientation(orientation)

    image = decode(data, limits=LIMITS)

    assert image.size == ((HEIGHT, WIDTH) if orientation >= 5 else (WIDTH, HEIGHT))
    assert np.array_equal(as_array(image), reference(data))


# --- animations -----------------------------------------------------------------------------------------------

FRAME_COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]


@pytest.mark.parametrize(("fmt", "options"), [("GIF", {}), ("WEBP", {"lossless": True})], ids=["gif", "webp"])
def test_an_animation_decodes_to_its_first_frame(fmt: str, options: dict[str, Any]) -> None:
    frames = [Image.new("RGB", (WIDTH, HEIGHT), colour) for colour in FRAME_COLOURS]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, loop=0, **options)
    with Image.open(io.BytesIO(data)) as opened:
        assert getattr(opened, "n_frames", 1) == len(FRAME_COLOURS)

    image = decode(data, limits=LIMITS)

    assert (image.mode, image.size) == ("RGB", (WIDTH, HEIGHT))
    assert image.getcolors() == [(WIDTH * HEIGHT, FRAME_COLOURS[0])]


# --- errors ---------------------------------------------------------------------------------------------------


def test_empty_bytes_are_a_bad_request() -> None:
    with pytest.raises(BadRequest) as raised:
        decode(b"", limits=LIMITS)

    assert type(raised.value) is BadRequest
    assert raised.value.code == "empty_image"
    assert status_of(raised.value) == 400


NOT_IMAGES: dict[str, bytes] = {
    "random": np.random.default_rng(1234).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
    "text": b"hello, this is plain text and not a picture\n" * 20,
    "html": b"<!DOCTYPE html>\n<html><head><title>x</title></head><body><img src='cat.png'></body></html>\n",
    "svg": (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>\n'
    ),
    "pdf": (
        b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog /Pages 2 0 R >>\nendobj\n"
        b"trailer\n<< /Root 1 0 R >>\n%%EOF\n"
    ),
    "one-byte": b"\xff",
    "png-signature-only": b"\x89PNG\r\n\x1a\n",
}


@pytest.mark.parametrize("data", list(NOT_IMAGES.values()), ids=list(NOT_IMAGES))
def test_what_is_not_an_image_is_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedMediaType) as raised:
        decode(data, limits=LIMITS)

    assert raised.value.code == "unsupported_image_format"
    assert status_of(raised.value) == 415


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "ICO", "TGA", "SGI"])
def test_an_image_format_pil_reads_but_the_service_does_not_accept_is_unsupported(fmt: str) -> None:
    data = encode(gradient_image(32, 32), fmt)
    assert reference(data).shape == (32, 32, 3)  # PIL itself would open it

    with pytest.raises(UnsupportedMediaType) as raised:
        decode(data, limits=LIMITS)

    assert raised.value.code == "unsupported_image_format"


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_a_truncated_image_is_invalid(fmt: str, fraction: float, chelsea_jpeg: bytes) -> None:
    whole = chelsea_jpeg if fmt == "JPEG" else encode(photo("chelsea"), "PNG")
    assert decode(whole, limits=LIMITS).size == (451, 300)

    with pytest.raises(InvalidImage) as raised:
        decode(whole[: int(len(whole) * fraction)], limits=LIMITS)

    assert raised.value.code == "invalid_image"
    assert status_of(raised.value) == 400


def entropy_coded_start(jpeg: bytes) -> int:
    """The offset of the first byte after the (last) start-of-scan header."""
    sos = jpeg.rfind(b"\xff\xda")
    assert sos > 0
    return sos + 2 + int.from_bytes(jpeg[sos + 2 : sos + 4], "big")


@pytest.mark.parametrize("seed", range(8))
def test_a_jpeg_with_corrupt_entropy_coded_data_is_invalid_or_decodes(seed: int, chelsea_jpeg: bytes) -> None:
    """JPEG decoders are lenient: either `InvalidImage`, or a picture of the right size; nothing else escapes."""
    start, end = entropy_coded_start(chelsea_jpeg), len(chelsea_jpeg) - 2  # before EOI
    rng = np.random.default_rng(seed)
    middle = (start + end) // 2 + int(rng.integers(-(end - start) // 4, (end - start) // 4))
    corrupt = bytearray(chelsea_jpeg)
    for offset in range(middle, middle + 48):
        corrupt[offset] ^= int(rng.integers(1, 256))

    try:
        image = decode(bytes(corrupt), limits=LIMITS)
    except InvalidImage as exc:
        assert exc.code == "invalid_image"
    else:
        assert (image.mode, image.size) == ("RGB", (451, 300))


@pytest.mark.parametrize("seed", range(4))
def test_a_png_with_corrupt_pixel_data_is_invalid_or_decodes(seed: int) -> None:
    data = bytearray(encode(gradient_image(64, 64), "PNG"))
    idat = data.find(b"IDAT") + 4
    rng = np.random.default_rng(seed)
    for offset in range(idat + 8, idat + 24):
        data[offset] ^= int(rng.integers(1, 256))

    try:
        image = decode(bytes(data), limits=LIMITS)
    except InvalidImage as exc:
        assert exc.code == "invalid_image"
    else:
        assert (image.mode, image.size) == ("RGB", (64, 64))


def test_no_decoder_exception_escapes_as_anything_but_a_client_error(chelsea_jpeg: bytes) -> None:
    """Every prefix-cut of a small JPEG and PNG ends as a 4xx ServeError (or an image), never a raw exception."""
    small_png = encode(gradient_image(16, 12), "PNG")
    small_jpeg = encode(gradient_image(16, 12), "JPEG")
    outcomes: set[str] = set()
    for whole in (small_png, small_jpeg):
        for cut in range(1, len(whole)):
            try:
                decode(whole[:cut], limits=LIMITS)
            except ServeError as exc:
                assert exc.fault.clients
                outcomes.add(exc.code)
            else:
                outcomes.add("decoded")
    assert "invalid_image" in outcomes
    assert outcomes <= {"invalid_image", "unsupported_image_format", "decoded"}


# --- size limit -----------------------------------------------------------------------------------------------


def test_an_image_over_max_pixels_is_too_large() -> None:
    data = encode(Image.new("RGB", (101, 100)), "PNG")

    with pytest.raises(PayloadTooLarge) as raised:
        decode(data, limits=ImageLimits(max_pixels=10_000))

    assert raised.value.code == "image_too_large"
    assert status_of(raised.value) == 413


def test_an_image_of_exactly_max_pixels_is_accepted() -> None:
    data = encode(Image.new("RGB", (100, 100), (1, 2, 3)), "PNG")

    assert decode(data, limits=ImageLimits(max_pixels=10_000)).size == (100, 100)


@pytest.mark.parametrize("max_pixels", [10_000, MAX_PIXELS, DEFAULT_MAX_PIXELS])
@pytest.mark.parametrize("side", [100_000, 10_000])
def test_a_huge_declared_size_is_refused_from_the_header_alone(max_pixels: int, side: int) -> None:
    """100000 x 100000 x RGB would be 30 GB of pixels: refused from a PNG of a few dozen bytes, never allocated.
    10000 x 10000 is between PIL's warning and error thresholds: refused the same way, warnings as errors or not."""
    data = png_header_only(side, side)
    assert len(data) < 300

    with pytest.raises(PayloadTooLarge) as raised:
        decode(data, limits=ImageLimits(max_pixels=max_pixels))

    assert raised.value.code == "image_too_large"


def test_the_size_check_comes_before_the_pixels_are_read() -> None:
    """Under PIL's own bomb limit, so it is decode's check: the tiny IDAT would otherwise fail as truncated."""
    assert (Image.MAX_IMAGE_PIXELS or 0) > 10_000 * 5_000
    assert DEFAULT_MAX_PIXELS == 40_000_000

    with pytest.raises(PayloadTooLarge) as raised:
        decode(png_header_only(10_000, 5_000), limits=ImageLimits(max_pixels=DEFAULT_MAX_PIXELS))
    assert raised.value.code == "image_too_large"
    assert "10000x5000" in raised.value.message

    with pytest.raises(InvalidImage):  # the same file, small enough: it is opened, and its pixel data is short
        decode(png_header_only(300, 200), limits=ImageLimits(max_pixels=DEFAULT_MAX_PIXELS))


# --- preprocessing --------------------------------------------------------------------------------------------

TINY = PreprocessParams(crop_size=32, resize_size=36)


@pytest.mark.parametrize("size", [(1, 1), (1, 64), (64, 1), (3, 2)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_extreme_shapes_decode_and_preprocess_to_the_crop(size: tuple[int, int]) -> None:
    colour = (10, 200, 30)
    data = encode(Image.new("RGB", size, colour), "PNG")

    image = decode(data, limits=LIMITS, resize_side=TINY.resize_size)
    tensor = build_preprocessor(TINY)(image)

    assert image.size == size
    assert tensor.shape == (3, 32, 32)
    assert tensor.dtype == torch.float32
    mean, std = torch.tensor(TINY.mean), torch.tensor(TINY.std)
    expected = ((torch.tensor(colour, dtype=torch.float32) / 255 - mean) / std)[:, None, None].expand(3, 32, 32)
    assert torch.allclose(tensor, expected, atol=1e-5)


@pytest.mark.parametrize("size", [(1, 10_000), (10_000, 1)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_shapes_past_the_aspect_ratio_or_that_the_resize_would_blow_up_are_refused_before_decoding(
    size: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = encode(Image.new("RGB", size), "PNG")
    loads: list[object] = []
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: loads.append(self))

    with pytest.raises(PayloadTooLarge) as aspect:
        decode(data, limits=LIMITS, resize_side=TINY.resize_size)
    lenient = ImageLimits(max_pixels=MAX_PIXELS, max_aspect_ratio=1e6)
    with pytest.raises(PayloadTooLarge) as resized:  # 36 x 360,000 pixels once resized
        decode(data, limits=lenient, resize_side=TINY.resize_size)

    assert (aspect.value.code, resized.value.code) == ("image_aspect_ratio", "image_output_too_large")
    assert "12960000 pixels" in resized.value.message
    assert not loads


def test_the_v1_preset_is_the_default_params() -> None:
    assert PreprocessParams(**preset_params(ViT_B_16_Weights.IMAGENET1K_V1.transforms)) == PreprocessParams(
        crop_size=224, resize_size=256
    )


PHOTOS: dict[str, Callable[[], bytes]] = {
    "chelsea-jpeg": lambda: encode(photo("chelsea"), "JPEG", quality=90),
    "astronaut-png": lambda: encode(photo("astronaut"), "PNG"),
    "coffee-jpeg-rotated": lambda: encode(photo("coffee"), "JPEG", exif=orientation_exif(6).tobytes()),
}


@pytest.mark.parametrize("photo", list(PHOTOS), ids=list(PHOTOS))
@pytest.mark.parametrize(
    ("weights", "crop"),
    [(ViT_B_16_Weights.IMAGENET1K_V1, 224), (ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1, 384)],
    ids=["v1", "swag"],
)
def test_preprocessing_equals_torchvision_preset_exactly(weights: ViT_B_16_Weights, crop: int, photo: str) -> None:
    data = PHOTOS[photo]()
    with Image.open(io.BytesIO(data)) as opened:
        expected = weights.transforms()(ImageOps.exif_transpose(opened).convert("RGB"))
    params = PreprocessParams(**preset_params(weights.transforms))
    if weights is ViT_B_16_Weights.IMAGENET1K_V1:
        assert params == PreprocessParams(crop_size=224, resize_size=256)

    tensor = build_preprocessor(params)(decode(data, limits=LIMITS))

    assert tensor.shape == expected.shape == (3, crop, crop)
    assert tensor.dtype == expected.dtype == torch.float32
    assert torch.equal(tensor, expected)


def test_jpeg_draft_decodes_a_large_photo_at_a_reduced_scale_but_never_below_the_resize() -> None:
    """Opt-in (`jpeg_draft`): libjpeg's DCT-domain scaling. Measured on 9 photographs with a random ViT-B/16: the same
    top-1 for all; logits within 0.002-0.004 relative for 1920x1280 photos, up to 0.025 when the draft itself lands
    on the resize size (512x512 -> 256x256)."""
    preset = build_preprocessor(PreprocessParams(crop_size=224, resize_size=256))
    photo = _jpeg(Image.fromarray(skimage.data.chelsea()).resize((1920, 1280), Image.Resampling.BILINEAR))
    drafted = decode(photo, limits=LARGE, draft_size=256)
    assert drafted.size == (480, 320) and drafted.mode == "RGB"  # 1/4 scale; 1/8 would be 240x160, below 256
    exact = preset(decode(photo, limits=LARGE))
    assert (preset(drafted) - exact).abs().mean().item() < 0.02  # measured 0.0099 (normalised units)
    small = _jpeg(Image.fromarray(skimage.data.chelsea()))  # 451x300: no reduction keeps both sides >= 256
    assert np.array_equal(
        np.asarray(decode(small, limits=LARGE, draft_size=256)),
        np.asarray(decode(small, limits=LARGE)),
    )
    png = io.BytesIO()
    Image.fromarray(skimage.data.coffee()).save(png, format="PNG")
    assert decode(png.getvalue(), limits=LARGE, draft_size=64).size == (600, 400)  # only JPEGs have a draft mode
    with pytest.raises(PayloadTooLarge):  # the pixel limit counts the full size, not the draft's
        decode(photo, limits=ImageLimits(max_pixels=1920 * 1280 - 1), draft_size=256)


def _jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()
