"""The picture of an explanation: the image the model saw, with an attention map laid over it, as a PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

# matplotlib's "inferno" at 10 evenly spaced points, as 8-bit RGB.
INFERNO = (
    (0, 0, 4),
    (27, 12, 65),
    (74, 12, 107),
    (120, 28, 109),
    (165, 44, 96),
    (207, 68, 70),
    (237, 105, 37),
    (251, 155, 6),
    (247, 209, 61),
    (252, 255, 164),
)


def model_view(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A preprocessed (3, h, w) image, normalized with `mean`/`std` -> (3, h, w) uint8: what the model saw."""
    if pixels.ndim != 3 or pixels.shape[0] != 3 or len(mean) != 3 or len(std) != 3:
        raise ValueError(f"expected a (3, h, w) image and 3 means and stds, got {tuple(pixels.shape)}")
    shift = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    scale = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    unit = pixels.float() * scale + shift  # back to [0, 1], up to what resizing overshot
    return (unit * 255).round().clamp(0, 255).to(torch.uint8)


def overlay_png(view: torch.Tensor, heat: torch.Tensor, *, alpha: float = 0.5) -> bytes:
    """PNG bytes (w x h, RGB) of `heat` (rows, cols) over `view` (3, h, w) uint8.

    The heat map is upsampled to the image (bilinear), divided by its max (negative values count as 0; an all-zero
    map stays 0), coloured with "inferno" (black -> purple -> orange -> pale yellow) and blended as
    (1 - alpha)·view + alpha·colour at every pixel.
    """
    if view.dtype != torch.uint8 or view.ndim != 3 or view.shape[0] != 3:
        raise ValueError(f"expected a (3, h, w) uint8 view, got {view.dtype} {tuple(view.shape)}")
    if heat.ndim != 2:
        raise ValueError(f"expected a (rows, cols) heat map, got {tuple(heat.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    _, height, width = view.shape
    heat = heat.detach().to("cpu", torch.float32).clamp_min(0)
    # (rows, cols) -> (1, 1, rows, cols) -> (1, 1, h, w) -> (h, w)
    upsampled = F.interpolate(heat[None, None], size=(height, width), mode="bilinear", align_corners=False)[0, 0]
    peak = upsampled.max()
    level = (upsampled / peak).clamp(0, 1) if peak > 0 else torch.zeros_like(upsampled)
    blended = (1.0 - alpha) * view.detach().cpu().float() + alpha * _inferno(level)
    pixels = blended.round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).contiguous()  # (3, h, w) -> (h, w, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    return buffer.getvalue()


def _inferno(level: torch.Tensor) -> torch.Tensor:
    """(h, w) values in [0, 1] -> (3, h, w) float RGB in [0, 255], linear between the anchor colours."""
    anchors = torch.tensor(INFERNO, dtype=torch.float32)
    position = level * (len(INFERNO) - 1)
    low = position.floor().long().clamp(max=len(INFERNO) - 2)
    fraction = (position - low).unsqueeze(-1)
    rgb = anchors[low] * (1 - fraction) + anchors[low + 1] * fraction  # (h, w, 3)
    return rgb.permute(2, 0, 1)
