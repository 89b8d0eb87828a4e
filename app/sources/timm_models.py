"""`arch = "timm:<model name>"`: a timm model (`vit_small_patch16_224`, DeiT, EVA, ...) with a local weights file.

The model is built by `timm.create_model(name, pretrained=False, num_classes=...)` (nothing downloaded) and the file's
state_dict loaded into it; its preprocessing is timm's own evaluation transform for that model
(`resolve_data_config` + `create_transform`). Needs the `timm` extra: `pip install 'vit-serve[timm]'`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from torch import nn

from app.config.model_config import ModelConfig
from app.errors import ModelLoadError
from app.sources.extras import require


@dataclass(frozen=True, slots=True)
class TimmModel:
    module: nn.Module
    preprocessor: Callable[[Image.Image | torch.Tensor], torch.Tensor]
    preprocess_info: dict[str, Any]


def model_name(config: ModelConfig) -> str:
    return config.arch.removeprefix("timm:")


def build_timm(config: ModelConfig, num_classes: int) -> TimmModel:
    timm = require("timm", "timm", "timm", config)
    name = model_name(config)
    try:
        module: nn.Module = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as exc:  # timm's "Unknown model"
        raise ModelLoadError(f"model {config.name!r}: timm has no model {name!r} ({exc})") from exc
    data_config = timm.data.resolve_data_config({}, model=module)
    transform = timm.data.create_transform(**data_config)
    info = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}
    return TimmModel(module, transform, info)
