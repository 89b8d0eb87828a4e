"""The per-batch memory bound on a GPU: how many images one forward may take within a fraction of device memory."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def forward_bytes_per_image(forward: Callable[[torch.Tensor], torch.Tensor], example: torch.Tensor) -> int:
    """The device memory one image's forward allocates at its peak, measured on the batch `example` (on CUDA)."""
    device = example.device
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        forward(example)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return max(1, math.ceil((peak - before) / example.shape[0]))


def images_per_forward(bytes_per_image: int, device_bytes: int, fraction: float, max_batch_size: int) -> int:
    """The most images one forward may take so that it allocates at most `fraction` of `device_bytes` (at least 1)."""
    fits = int(device_bytes * fraction) // max(1, bytes_per_image)
    return max(1, min(max_batch_size, fits))
