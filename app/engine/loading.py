"""The one way to build a served model from the settings: its config read from the model repository, its weights
loaded on the settings' device and dtype, with its batching and acceleration as set. The engine (at start and while
serving) and the batch predictor both load through it, so a model served and a model run in a batch job are the same.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from app.config.settings import Settings
from app.engine.descriptions import ModelInfo
from app.engine.served_model import ServedModel
from app.errors import ModelLoadError
from app.runtime.backends.registry import backend_for
from app.runtime.device import check_acceleration, resolve_device, resolve_dtype
from app.sources.registry import load_model, read_config

log = logging.getLogger(__name__)


class ModelLoader:
    """`loader(name)` -> that model of the settings' repository, loaded (blocking; raises `ModelLoadError`), not yet
    warm. The device, dtype and acceleration are resolved (and checked) once, when the loader is made."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.dtype = resolve_dtype(settings.dtype, self.device)
        self.acceleration = settings.acceleration()
        check_acceleration(self.acceleration, self.device)

    def __call__(self, name: str) -> ServedModel:
        settings = self.settings
        config = read_config(
            settings.model_repository,
            name,
            weights_override=settings.weights if name == settings.default_model else None,
        )
        acceleration = config.acceleration_config(self.acceleration)
        backend = backend_for(acceleration.backend)
        try:  # before any weights are read: a backend not installed, or not for this device, is one line
            backend.check(self.device, self.dtype, acceleration.precision)
        except ModelLoadError as exc:
            raise ModelLoadError(f"model {config.name!r}: {exc}") from None
        loaded = load_model(
            config,
            device=self.device,
            dtype=backend.module_dtype(self.dtype),
            cache_dir=settings.weights_cache_dir,
        )
        model = ServedModel(
            config.name,
            config.arch,
            loaded,
            device=self.device,
            dtype=self.dtype,
            batching=config.batching_config(settings.batching(on_cpu=self.device.type == "cpu")),
            acceleration=acceleration,
            gate=config.accuracy_gate,
            calibration=config.calibration_folder,
            export_dir=export_cache(settings.weights_cache_dir),
            fingerprint=config.model_dump_json(include={"arch", "num_classes", "arch_params", "labels"}),
        )
        info = model.info()
        log.info(
            "model %r loaded: %s, weights %s, %s %s, %d parameters, batching %s",
            info.name,
            info.arch,
            info.weights,
            info.device,
            info.dtype,
            info.num_params,
            info.batching,
            extra={"fields": _startup_fields(info)},
        )
        return model


def export_cache(weights_cache_dir: Path | None) -> Path:
    """Where ONNX exports are cached: `exports/` beside the downloaded weights (torch hub's folder by default)."""
    return (weights_cache_dir or Path(torch.hub.get_dir())) / "vit-serve-exports"


def _startup_fields(info: ModelInfo) -> dict[str, object]:
    fields = info.as_json()
    fields["model"] = fields.pop("name")
    del fields["ready"], fields["request_timeout_s"]
    return fields
