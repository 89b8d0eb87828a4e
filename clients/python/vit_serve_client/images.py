"""Whatever a caller holds as an image -> the bytes to send: a path, bytes, a PIL image or a numpy array."""

from __future__ import annotations

import io
import mimetypes
from pathlib import Path
from typing import Any, Union

from PIL import Image

ImageLike = Union[str, Path, bytes, bytearray, memoryview, Image.Image, Any]  # Any: a numpy array  # noqa: UP007


def encode(image: ImageLike) -> tuple[bytes, str]:
    """(bytes, content type). Files and bytes are sent as they are; PIL images and arrays as lossless PNG."""
    if isinstance(image, str | Path):
        path = Path(image)
        content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return path.read_bytes(), content_type
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image), "application/octet-stream"
    if isinstance(image, Image.Image):
        return _png(image), "image/png"
    if hasattr(image, "__array_interface__"):  # numpy: (h, w) or (h, w, 3|4), uint8
        return _png(Image.fromarray(image)), "image/png"
    raise TypeError(f"cannot send a {type(image).__name__} as an image: give a path, bytes, a PIL image or an array")


def name_of(image: ImageLike, index: int) -> str:
    """A file name for the multipart part: the path's own, else `image<index>`."""
    return Path(image).name if isinstance(image, str | Path) else f"image{index}"


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
