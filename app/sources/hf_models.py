"""`arch = "hf"`: a Hugging Face Transformers image classifier from a local folder in its own layout.

The folder (`weights`, default the model folder itself) holds `config.json`, `model.safetensors` or
`pytorch_model.bin`, and `preprocessor_config.json`. The model comes from `AutoModelForImageClassification`, its
preprocessing is its own image processor (so served inputs are exactly what `processor(images=...)` gives), its labels
are `config.json`'s `id2label` unless model.toml names others. Nothing is fetched from a hub (`local_files_only`).
Needs the `hf` extra: `pip install 'vit-serve[hf]'`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from app.config.model_config import ModelConfig
from app.errors import ModelLoadError
from app.sources.extras import require

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


class LogitsOf(nn.Module):
    """A Transformers classifier as a plain `pixels -> logits` module."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.model(pixel_values=pixels).logits
        return logits


class ProcessorTransform:
    """The model's own image processor, one PIL image at a time: -> (3, h, w) float32."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        pixels: torch.Tensor = self.processor(images=image, return_tensors="pt")["pixel_values"][0]
        return pixels.float()


@dataclass(frozen=True, slots=True)
class HFModel:
    module: nn.Module
    labels: list[str] | None  # from id2label; None when the config has only generic LABEL_i names
    preprocessor: ProcessorTransform
    preprocess_info: dict[str, Any]
    source: str


def load_hf(config: ModelConfig) -> HFModel:
    transformers = require("transformers", "hf", "Hugging Face Transformers", config)
    folder = config.resolve(config.weights)
    missing = [name for name in ("config.json", "preprocessor_config.json") if not (folder / name).is_file()]
    if not any((folder / name).is_file() for name in WEIGHT_FILES):
        missing.append(" or ".join(WEIGHT_FILES))
    if missing:
        raise ModelLoadError(
            f"model {config.name!r}: {folder} is not a Hugging Face model folder: no {', '.join(missing)} "
            "(save one with model.save_pretrained(folder) and processor.save_pretrained(folder))"
        )
    try:
        model = transformers.AutoModelForImageClassification.from_pretrained(str(folder), local_files_only=True)
        processor = transformers.AutoImageProcessor.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelLoadError(f"model {config.name!r}: cannot load the Hugging Face model in {folder}: {exc}") from exc
    id2label = {int(k): v for k, v in (model.config.id2label or {}).items()}
    labels = [id2label[i] for i in range(model.config.num_labels)] if id2label else None
    if labels is not None and labels == [f"LABEL_{i}" for i in range(len(labels))]:
        labels = None  # the library's placeholder names: let model.toml's labels or num_classes decide
    info = {"image_processor": type(processor).__name__, **_pixel_settings(processor.to_dict())}
    return HFModel(LogitsOf(model), labels, ProcessorTransform(processor), info, f"hf:{folder}")


def _pixel_settings(settings: dict[str, Any]) -> dict[str, Any]:
    keys = ("size", "crop_size", "do_center_crop", "resample", "rescale_factor", "image_mean", "image_std")
    return {k: (int(v) if k == "resample" and v is not None else v) for k, v in settings.items() if k in keys}
