"""A folder for batch jobs: ~200 small generated images in several formats and sizes, real photographs, and bad
files (a truncated JPEG, random bytes, text, an empty file, a broken link)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests.support.fakes import tiny_vit, write_model_folder
from tests.support.photos import jpeg, photo

GENERATED = 190
PHOTOS = ("chelsea", "astronaut", "coffee", "rocket", "camera")
FORMATS = (("PNG", ".png"), ("JPEG", ".jpg"), ("WEBP", ".webp"), ("BMP", ".bmp"), ("GIF", ".gif"))
BAD = ("truncated.jpg", "random.jpg", "notes.png", "empty.png", "gone.jpg")


def write_tiny_repository(root: Path) -> Path:
    """A model repository with one model, `tiny`: a random-weight ViT of 64x64 images and 10 classes."""
    write_model_folder(root, "tiny", tiny_vit(image_size=64, num_classes=10))
    return root


def write_image_folder(root: Path) -> list[Path]:
    """Every file of the folder, in the order a folder walk finds them; the bad ones are named in `BAD`."""
    rng = np.random.default_rng(0)
    (root / "generated").mkdir(parents=True)
    (root / "photos").mkdir()
    for i in range(GENERATED):
        fmt, suffix = FORMATS[i % len(FORMATS)]
        width, height = (int(v) for v in rng.integers(24, 96, size=2))
        gradient = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
        noise = rng.integers(0, 64, size=(height, width, 3)).astype(np.float32)
        pixels = np.clip(gradient * rng.uniform(0.2, 1.0, size=3) + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format=fmt)
        (root / "generated" / f"{i:03d}{suffix}").write_bytes(buffer.getvalue())
    for name in PHOTOS:
        (root / "photos" / f"{name}.jpg").write_bytes(jpeg(photo(name)))
    (root / "photos" / "truncated.jpg").write_bytes(jpeg(photo("chelsea"))[:3000])
    (root / "photos" / "random.jpg").write_bytes(rng.integers(0, 256, size=2048, dtype=np.uint8).tobytes())
    (root / "photos" / "notes.png").write_text("not a picture")
    (root / "photos" / "empty.png").write_bytes(b"")
    (root / "photos" / "gone.jpg").symlink_to(root / "nowhere.jpg")
    (root / "photos" / "README.txt").write_text("not an image suffix: not an input")
    return sorted(p for p in root.rglob("*") if p.suffix != ".txt" and (p.is_file() or p.is_symlink()))
