"""Stage 2, preprocess: a decoded RGB image -> the model's input tensor, with torchvision's own preset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms._presets import ImageClassification

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


def build_preprocessor(params: PreprocessParams) -> ImageClassification:
    """The exact transform torchvision's weights ship: resize, center crop, to float in [0, 1], normalize."""
    return ImageClassification(
        crop_size=params.crop_size,
        resize_size=params.resize_size,
        mean=params.mean,
        std=params.std,
        interpolation=InterpolationMode(params.interpolation),
    )


def preset_params(preset: Callable[..., Any]) -> dict[str, Any]:
    """The keyword arguments of a torchvision weights' `transforms` partial, as `PreprocessParams` fields."""
    keywords = dict(getattr(preset, "keywords", {}))
    if isinstance(keywords.get("interpolation"), InterpolationMode):
        keywords["interpolation"] = keywords["interpolation"].value
    defaults = PreprocessParams(crop_size=224, resize_size=256).as_dict()
    return {**defaults, **keywords}


def preprocess(image: Image.Image, preprocessor: Preprocessor) -> torch.Tensor:
    """(h, w) RGB PIL image -> (3, crop, crop) float32 tensor."""
    return preprocessor(image)
