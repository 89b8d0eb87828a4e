"""Real photographs for numerical checks: scikit-image's, or the same saved as PNGs in `$VIT_TEST_PHOTOS` (the GPU
host has no scikit-image; bench/gpu_check.sh brings them)."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("chelsea", "astronaut", "coffee", "rocket", "camera", "immunohistochemistry")


def photo(name: str) -> np.ndarray:
    folder = os.environ.get("VIT_TEST_PHOTOS")
    if folder:
        return np.asarray(Image.open(Path(folder) / f"{name}.png"))
    import skimage.data

    array: np.ndarray = getattr(skimage.data, name)()
    return array


def jpeg(array: np.ndarray, *, size: tuple[int, int] | None = None, quality: int = 90) -> bytes:
    image = Image.fromarray(array)
    if size is not None:
        image = image.convert("RGB").resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def photo_jpegs() -> dict[str, bytes]:
    """Every photograph as a JPEG (quality 90), and chelsea at 1920x1280 as a camera would give it."""
    jpegs = {name: jpeg(photo(name)) for name in NAMES}
    jpegs["chelsea_1920x1280"] = jpeg(photo("chelsea"), size=(1920, 1280))
    return jpegs


def export(folder: Path) -> None:
    """Save every photograph as a PNG in `folder`, for `$VIT_TEST_PHOTOS` on a host without scikit-image."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        Image.fromarray(photo(name)).save(folder / f"{name}.png")
