"""A lane for a 224x224, 1000-class model with torchvision's default preset, for the lane tests (CPU and GPU)."""

from __future__ import annotations

import torch

from app.pipeline.decode import decode
from app.pipeline.image_scan import ImageLimits
from app.pipeline.preprocess import Preprocessor, PreprocessParams, build_preprocessor
from app.runtime.lanes import Lane, LaneSpec
from app.runtime.runner import Forward

PRESET: Preprocessor = build_preprocessor(PreprocessParams(crop_size=224, resize_size=256))


def preset_pixels(data: bytes) -> torch.Tensor:
    """The CPU path: PIL decode and the preset, (3, 224, 224) float32."""
    return PRESET(decode(data, limits=ImageLimits(max_pixels=10**9)))


def preset_lane(
    forward: Forward, *, device: torch.device, dtype: torch.dtype, max_batch: int, per_forward: int
) -> Lane:
    spec = LaneSpec(
        device=device,
        dtype=dtype,
        input_shape=(3, 224, 224),
        max_batch_size=max_batch,
        num_classes=1000,
        embedding_dim=0,
        max_images_per_forward=per_forward,
        preprocessor=PRESET,
        decode_on_cpu=preset_pixels,
    )
    return Lane(spec, forward)
