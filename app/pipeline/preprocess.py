"""Stage 2, preprocess: a decoded RGB image -> the model's input tensor, with torchvision's own preset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Preprocessor = Callable[[Image.Image | torch.Tensor], torch.Tensor]  # PIL image, or (3, h, w) uint8 tensor


@dataclass(frozen=True, slots=True)
class PreprocessParams:
    """The arguments of torchvision's `ImageClassification` preset, as data."""

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def for_image_size(cls, image_size: int) -> PreprocessParams:
        """torchvision's ratio (resize 256, crop 224) carried over to another input size."""
        return cls(crop_size=image_size, resize_size=round(image_size * 256 / 224))

    def with_overrides(self, overrides: dict[str, Any]) -> PreprocessParams:
        values = {**self.as_dict(), **overrides}
        values["mean"] = tuple(values["mean"])
        values["std"] = tuple(values["std"])
        return PreprocessParams(**values)

    def as_dict(self) -> dict[str, Any]:
        return {
            "crop_size": self.crop_size,
            "resize_size": self.resize_size,
            "mean": self.mean,
            "std": self.std,
            "interpolation": self.interpolation,
        }


def build_preprocessor(params: PreprocessParams) -> transforms.Compose:
    """The transform torchvision's weights ship (`weights.transforms()`), from its public parts, step for step:
    resize, center crop, to float in [0, 1], normalize. Takes a PIL image, a (3, h, w) or an (n, 3, h, w) uint8 tensor.

    The v1 transforms, not v2: v2 resizes uint8 tensors with its own kernel and scales by multiplying by 1/255, so its
    results differ from the preset's in the last bits; these call the very functions the preset calls.
    """
    return transforms.Compose(
        [
            transforms.Resize(
                params.resize_size, interpolation=InterpolationMode(params.interpolation), antialias=True
            ),
            transforms.CenterCrop(params.crop_size),
            _as_tensor,
            transforms.ConvertImageDtype(torch.float),
            transforms.Normalize(params.mean, params.std),
        ]
    )


def _as_tensor(image: Image.Image | torch.Tensor) -> torch.Tensor:
    """A PIL image as a (3, h, w) uint8 tensor; a tensor as it is."""
    return image if isinstance(image, torch.Tensor) else F.pil_to_tensor(image)


def preset_params(weights_transforms: Callable[[], Any]) -> dict[str, Any]:
    """The parameters of a torchvision weights' preset (`weights.transforms`), as `PreprocessParams` fields."""
    preset = weights_transforms()
    return {
        "crop_size": int(preset.crop_size[0]),
        "resize_size": int(preset.resize_size[0]),
        "mean": tuple(preset.mean),
        "std": tuple(preset.std),
        "interpolation": InterpolationMode(preset.interpolation).value,
    }


def preprocess(image: Image.Image, preprocessor: Preprocessor) -> torch.Tensor:
    """(h, w) RGB PIL image -> (3, crop, crop) float32 tensor."""
    return preprocessor(image)
