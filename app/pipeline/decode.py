"""Stage 1, decode: encoded bytes -> an RGB PIL image, upright, its cost checked from the header before pixels are
allocated (`image_scan`)."""

from __future__ import annotations

import io

from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import BadRequest, InvalidImage, PayloadTooLarge, UnsupportedMediaType
from app.pipeline.image_scan import ImageLimits, check_size, check_structure

# PIL format names. The JPEG plugin also opens MPO, what many cameras and phones write (a JPEG with extra frames).
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
ACCEPTED_FORMATS_TEXT = "JPEG, PNG, WebP, BMP, GIF or TIFF"


def decode(
    data: bytes, *, limits: ImageLimits, resize_side: int | None = None, draft_size: int | None = None
) -> Image.Image:
    """Decode one image: the first frame, EXIF orientation applied, converted to RGB.

    With `draft_size`, a JPEG is decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (libjpeg's scaled decoding,
    through PIL's `draft`), the largest reduction that keeps both sides at least `draft_size`: several times faster
    on large photos, and slightly different pixels. Raises a 4xx `ServeError` for anything that is not a decodable
    image within `limits`: its structure, its size, and the size it becomes once its short side is resized to
    `resize_side` (all checked on the header, before the decoder runs).
    """
    if not data:
        raise BadRequest("empty image", code="empty_image")
    check_structure(data, limits)
    try:
        image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType(
            f"not an image in an accepted format ({ACCEPTED_FORMATS_TEXT})", code="unsupported_image_format"
        ) from exc
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning when -W error
        raise _too_many_pixels(limits.max_pixels) from exc
    except Exception as exc:  # a decoder fed untrusted bytes can raise anything; it is the image's fault
        raise InvalidImage(f"cannot decode image: {_reason(exc)}") from exc
    width, height = image.size
    try:
        check_size(width, height, limits, resize_side=resize_side)
    except PayloadTooLarge:
        image.close()
        raise
    if width == 0 or height == 0:
        raise InvalidImage("image has no pixels")
    result: Image.Image | None = None
    try:
        if draft_size is not None and image.format == "JPEG":
            image.draft(image.mode, (draft_size, draft_size))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # no copy when the picture is already upright
        if image.mode == "P" and "transparency" in image.info:
            # Same RGB values as a direct convert, without PIL's warning about palette transparency.
            result = image.convert("RGBA").convert("RGB")
        else:
            result = image if image.mode == "RGB" else image.convert("RGB")  # no copy when already RGB
        return result
    except Image.DecompressionBombError as exc:
        raise _too_many_pixels(limits.max_pixels) from exc
    except Exception as exc:  # as above
        raise InvalidImage(f"cannot decode {image.format} image: {_reason(exc)}") from exc
    finally:
        if result is not image:
            image.close()


def _too_many_pixels(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"image is over the limit of {limit} pixels", code="image_too_large")


def _reason(exc: BaseException) -> str:
    """A short, safe description of a decoder error (PIL's messages name no paths for in-memory files)."""
    text = str(exc).strip() or type(exc).__name__
    return text[:200]
