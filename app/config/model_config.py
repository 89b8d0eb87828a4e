"""The model repository: one folder per model, each described by a `model.toml`."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from app.config.settings import BatchingConfig
from app.errors import ModelLoadError, describe_validation_error

TORCHVISION_ARCHS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
CONFIG_FILE = "model.toml"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ArchParams(_Strict):
    """torchvision `VisionTransformer` arguments, for `arch = "vit"`."""

    image_size: PositiveInt
    patch_size: PositiveInt
    num_layers: PositiveInt
    num_heads: PositiveInt
    hidden_dim: PositiveInt
    mlp_dim: PositiveInt


class PreprocessConfig(_Strict):
    """Overrides of torchvision's `ImageClassification` preset; unset fields come from the weights or defaults."""

    resize_size: PositiveInt | None = None
    crop_size: PositiveInt | None = None
    mean: tuple[float, float, float] | None = None
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None = None
    interpolation: Literal["nearest", "bilinear", "bicubic"] | None = None


class BatchingOverrides(_Strict):
    max_batch_size: PositiveInt | None = None
    max_queue_delay_ms: Annotated[float, Field(ge=0)] | None = None
    max_queue_size: PositiveInt | None = None


class ModelConfig(_Strict):
    """One model folder's `model.toml`, plus where it was found."""

    name: str
    folder: Path
    arch: str
    weights: str
    labels: str | None = None
    num_classes: PositiveInt | None = None
    arch_params: ArchParams | None = None
    preprocess: PreprocessConfig = PreprocessConfig()
    batching: BatchingOverrides = BatchingOverrides()

    def batching_config(self, defaults: BatchingConfig) -> BatchingConfig:
        overrides = self.batching.model_dump(exclude_none=True)
        return defaults.model_copy(update=overrides)

    def resolve(self, relative: str) -> Path:
        """A path from the config, relative to the model's folder."""
        return (self.folder / relative).resolve()


def load_model_config(repository: Path, name: str, *, weights_override: str | None = None) -> ModelConfig:
    """Read `repository/name/model.toml`; every problem becomes one `ModelLoadError` line."""
    folder = repository / name
    path = folder / CONFIG_FILE
    if not path.is_file():
        available = list_models(repository)
        hint = f"models in {repository}: {', '.join(available)}" if available else f"{repository} has none"
        raise ModelLoadError(f"model {name!r}: no {path} ({hint})")
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ModelLoadError(f"model {name!r}: cannot read {path}: {exc}") from exc
    if weights_override is not None:
        raw["weights"] = _weights_from_command_line(weights_override)
    if raw.get("arch") == "hf":
        raw.setdefault("weights", ".")  # the Hugging Face files in the model folder itself
    try:
        config = ModelConfig(name=name, folder=folder.resolve(), **raw)
    except ValidationError as exc:
        raise ModelLoadError(f"model {name!r}: {path}: {describe_validation_error(exc)}") from exc
    _check_arch(config, path)
    return config


def list_models(repository: Path) -> list[str]:
    if not repository.is_dir():
        return []
    return sorted(p.name for p in repository.iterdir() if (p / CONFIG_FILE).is_file())


def _weights_from_command_line(value: str) -> str:
    """A weights file given on the command line is relative to the working directory, not the model folder."""
    path = Path(value)
    return str(path.resolve()) if path.suffix and path.exists() else value


def _check_arch(config: ModelConfig, path: Path) -> None:
    where = f"model {config.name!r}: {path}:"
    if config.arch == "vit":
        if config.arch_params is None:
            raise ModelLoadError(f'{where} arch = "vit" needs an [arch_params] table')
    elif config.arch in TORCHVISION_ARCHS:
        if config.arch_params is not None:
            raise ModelLoadError(f'{where} [arch_params] is only for arch = "vit"; {config.arch} has fixed parameters')
    elif config.arch == "hf" or (config.arch.startswith("timm:") and config.arch != "timm:"):
        if config.arch_params is not None or config.preprocess != PreprocessConfig():
            raise ModelLoadError(
                f"{where} {config.arch} models bring their own architecture and preprocessing; "
                "remove [arch_params] and [preprocess]"
            )
    else:
        raise ModelLoadError(
            f"{where} unknown arch {config.arch!r}; "
            f'use one of {", ".join(TORCHVISION_ARCHS)}, "vit", "hf" or "timm:<timm model name>"'
        )
