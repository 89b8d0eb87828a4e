"""Stages 1 and 2 on the model's device (`decode_device = cuda`): JPEGs decoded as one batch with nvJPEG, then the
model's own torchvision preset (resize, center crop, normalize) on the decoded tensors.

The decode threads only read each JPEG's header (`probe_jpeg`, no pixels): the size limit and the format are checked
there, and anything the GPU path would get wrong (another format, CMYK, a rotated photo, a multi-picture file) is
decoded on the CPU as usual. nvJPEG's chroma upsampling is not libjpeg's, and the resize is torchvision's antialiased
tensor resize, not PIL's: pixels differ by about 0.5 grey level on average, up to 20 at single sharp colour edges
(measured on an H100; the effect on logits is in the README).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from app.pipeline.preprocess import Preprocessor

EXIF_ORIENTATION = 0x0112
UPRIGHT = 1
END_OF_IMAGE = b"\xff\xd9"


@dataclass(frozen=True, slots=True, eq=False)
class EncodedJpeg:
    """A JPEG the device path can decode as it is: its bytes, as a uint8 tensor and as they came."""

    data: torch.Tensor  # (nbytes,) uint8, on the CPU
    encoded: bytes
    width: int
    height: int


def probe_jpeg(data: bytes, *, max_pixels: int) -> EncodedJpeg | None:
    """The image as an `EncodedJpeg` if the device path takes it as it is, else None (decode it on the CPU).

    Reads the header only. Anything that is not a complete (ending in its end-of-image marker), plain, upright RGB or
    greyscale JPEG within the pixel limit is left to the CPU path, which also gives the right error for what is not an
    image at all. (nvJPEG, unlike libjpeg, decodes a truncated JPEG without an error, into garbage.)
    """
    if not data.endswith(END_OF_IMAGE):  # cut short, or with trailing bytes: nvJPEG would decode garbage silently
        return None
    try:
        with Image.open(io.BytesIO(data), formats=("JPEG",)) as image:
            width, height = image.size
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):  # MPO, CMYK, YCCK
                return None
            if not 0 < width * height <= max_pixels:
                return None
            if image.getexif().get(EXIF_ORIENTATION, UPRIGHT) != UPRIGHT:
                return None
    except Exception:  # not a JPEG, or a header PIL cannot read: the CPU path says what is wrong
        return None
    return EncodedJpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), data, width, height)


def decode_jpegs(images: Sequence[EncodedJpeg], device: torch.device) -> list[torch.Tensor | None]:
    """Decode a batch of JPEGs on `device`: (3, h, w) uint8 each, or None for one the decoder refused.

    One batched call; if it fails, each image alone, so that one bad image fails only itself.
    """
    data = [image.data for image in images]
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded: list[torch.Tensor | None] = []
        for one in data:
            try:
                decoded.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
        return decoded


def preprocess_decoded(
    images: Sequence[torch.Tensor], preprocessor: Preprocessor, *, together: bool | None = None
) -> torch.Tensor:
    """(3, h, w) uint8 tensors of any sizes -> (n, 3, crop, crop) float32, with the model's preset, on their device.

    `together` (default: on a GPU) runs images of the same size through the preset as one (k, 3, h, w) batch: one
    set of resize kernels for a batch of photographs from the same camera instead of one per image; each image's
    result is the same either way. On the CPU one at a time is faster (measured by bench/gpu_stages.py --smoke).
    """
    if together is None:
        together = bool(images) and images[0].device.type == "cuda"
    if not together:
        return torch.stack([preprocessor(image) for image in images])
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(index)
    out: list[torch.Tensor | None] = [None] * len(images)
    for indices in groups.values():
        done = preprocessor(torch.stack([images[i] for i in indices]))
        for position, index in enumerate(indices):
            out[index] = done[position]
    return torch.stack([tensor for tensor in out if tensor is not None])
