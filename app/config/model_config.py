"""The model repository: one folder per model, each described by a `model.toml`."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, ValidationError

from app.config.settings import AccelerationConfig, BackendName, BatchingConfig, Precision
from app.errors import ModelLoadError, describe_validation_error

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
    max_queue_bytes: PositiveInt | None = None


Fraction = Annotated[float, Field(ge=0, le=1)]


class AccuracyGate(_Strict):
    """`[accuracy_gate]`: the bounds a fast path (any backend, dtype or decode other than torch fp32 on exact CPU
    decode) must meet against torch fp32 on the gate's images at start, else the model refuses to start. Unset bounds
    are measured and reported, not enforced."""

    min_top1_agreement: Fraction = 0.99
    min_top5_overlap: Fraction | None = None
    max_relative_error: Annotated[float, Field(ge=0)] | None = None
    max_mean_relative_error: Annotated[float, Field(ge=0)] | None = None
    images: PositiveInt = 64  # the most of the gate's images it runs


class ModelConfig(_Strict):
    """One model folder's `model.toml`, plus where it was found. What `arch`, `weights`, `[arch_params]` and
    `[preprocess]` may hold is up to the model source `arch` names (`app.sources.registry`), which checks them."""

    name: str
    folder: Path
    arch: str
    weights: str | None = None
    labels: str | None = None
    num_classes: PositiveInt | None = None
    arch_params: ArchParams | None = None
    preprocess: PreprocessConfig = PreprocessConfig()
    batching: BatchingOverrides = BatchingOverrides()
    backend: BackendName | None = None  # None: the global setting
    precision: Precision | None = None
    accuracy_gate: AccuracyGate = AccuracyGate()

    def batching_config(self, defaults: BatchingConfig) -> BatchingConfig:
        overrides = self.batching.model_dump(exclude_none=True)
        return defaults.model_copy(update=overrides)

    def acceleration_config(self, defaults: AccelerationConfig) -> AccelerationConfig:
        """The global acceleration settings with this model's backend and precision, where it sets them."""
        return dataclasses.replace(
            defaults, backend=self.backend or defaults.backend, precision=self.precision or defaults.precision
        )

    @property
    def calibration_folder(self) -> Path:
        """Images for int8 calibration and the accuracy gate: `calibration/` in the model's folder."""
        return self.folder / "calibration"

    @property
    def file(self) -> Path:
        return self.folder / CONFIG_FILE

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
    try:
        config = ModelConfig(name=name, folder=folder.resolve(), **raw)
    except ValidationError as exc:
        raise ModelLoadError(f"model {name!r}: {path}: {describe_validation_error(exc)}") from exc
    return config


def list_models(repository: Path) -> list[str]:
    if not repository.is_dir():
        return []
    return sorted(p.name for p in repository.iterdir() if (p / CONFIG_FILE).is_file())


def _weights_from_command_line(value: str) -> str:
    """A weights file given on the command line is relative to the working directory, not the model folder."""
    path = Path(value)
    return str(path.resolve()) if path.suffix and path.exists() else value
