"""model.toml's `arch` -> the source that builds it, and the one way in for the engine: read a config, load a model.

arch = "vit_b_16", "vit_l_16", ..., or "vit"   -> torchvision   (torchvision_models.py)
arch = "hf"                                    -> Hugging Face  (hf_models.py)
arch = "timm:<timm model name>"                -> timm          (timm_models.py)
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from app.config.model_config import ModelConfig, load_model_config
from app.errors import ModelLoadError
from app.sources.base import LoadedModel, ModelSource
from app.sources.hf_models import HuggingFaceSource
from app.sources.timm_models import TimmSource
from app.sources.torchvision_models import TorchvisionSource

SOURCES: list[ModelSource] = [TorchvisionSource(), HuggingFaceSource(), TimmSource()]


def register(source: ModelSource) -> None:
    """Serve the models whose `arch` `source` handles; the sources registered before it are asked first."""
    SOURCES.append(source)


def source_for(config: ModelConfig) -> ModelSource:
    for source in SOURCES:
        if source.handles(config.arch):
            return source
    *most, last = [source.archs for source in SOURCES]
    raise ModelLoadError(
        f"model {config.name!r}: {config.file}: unknown arch {config.arch!r}; use one of {', '.join(most)} or {last}"
    )


def read_config(repository: Path, name: str, *, weights_override: str | None = None) -> ModelConfig:
    """`repository/name/model.toml`, read and checked by its source (no weights read); raises `ModelLoadError`."""
    config = load_model_config(repository, name, weights_override=weights_override)
    source_for(config).check(config)
    return config


def load_model(
    config: ModelConfig, *, device: torch.device, dtype: torch.dtype, cache_dir: Path | None = None
) -> LoadedModel:
    """Build the model `config` describes and move it to `device` in `dtype`, in eval mode; with its embedding split
    and attention reader when its source has them. Raises `ModelLoadError`."""
    source = source_for(config)
    source.check(config)
    loaded = source.load(config, cache_dir=cache_dir)
    loaded.module.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return dataclasses.replace(
        loaded,
        embedding=source.split_head(loaded.module, loaded.image_size),
        attention=source.attention(loaded.module),
    )


def download_weights(config: ModelConfig, cache_dir: Path | None = None) -> Path | None:
    """Fetch a model's weights into the cache, exactly as start-up would (same file, same checks), without building
    it: for image builds. None when nothing is fetched (a local file, random weights, a source that reads files)."""
    source = source_for(config)
    source.check(config)
    return source.download(config, cache_dir)
