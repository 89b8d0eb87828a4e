"""Weights files for the sources that build a module and then fill it (torchvision, timm): a state_dict read from
`.pth` / `.safetensors`, checked against the module key by key, or `weights = "random"`, drawn the same every time."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.config.model_config import ModelConfig
from app.errors import ModelLoadError

log = logging.getLogger(__name__)

RANDOM = "random"
HINT = "set weights to a local file (model.toml or --weights / VIT_WEIGHTS), or `random` for a smoke test"


def load_weights_file(config: ModelConfig, module: nn.Module, path: Path) -> None:
    """Fill `module` from the state_dict in `path`; every problem is one `ModelLoadError` line saying what to do."""
    load_state_dict(config, module, read_state_dict(config, path))


def random_model(config: ModelConfig, build: Callable[[], nn.Module], num_classes: int) -> nn.Module:
    """Seeded, so every replica and restart serves the same random model; the head is drawn too, since
    torchvision initialises it to zeros (every logit 0), which would hide whether images reach the model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = build()
        for layer in module.modules():
            if isinstance(layer, nn.Linear) and layer.out_features == num_classes:
                nn.init.normal_(layer.weight, std=0.5)
    log.warning("model %r serves RANDOM weights: its predictions are meaningless", config.name)
    return module


def read_state_dict(config: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelLoadError(f"model {config.name!r}: weights file {path} not found; {HINT}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors: dict[str, torch.Tensor] = load_file(str(path), device="cpu")
            return tensors
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader error means the same thing to the user: the file is not usable
        raise ModelLoadError(
            f"model {config.name!r}: cannot read weights {path} ({short(exc)}); save a state_dict with "
            f"torch.save(model.state_dict(), ...) or safetensors"
        ) from exc
    return _unwrap_checkpoint(config, loaded)


def _unwrap_checkpoint(config: ModelConfig, loaded: Any) -> dict[str, torch.Tensor]:
    """A bare state_dict, or a training checkpoint holding one under "model" or "state_dict" (DDP prefix dropped)."""
    for key in ("model", "state_dict"):
        if isinstance(loaded, dict) and isinstance(loaded.get(key), dict):
            loaded = loaded[key]
            break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise ModelLoadError(f"model {config.name!r}: the weights file does not hold a state_dict")
    return {k.removeprefix("module."): v for k, v in loaded.items()}


def load_state_dict(config: ModelConfig, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        problems = []
        if missing:
            problems.append(f"missing {_few(missing)}")
        if unexpected:
            problems.append(f"unexpected {_few(unexpected)}")
        if wrong:
            k = wrong[0]
            problems.append(
                f"{len(wrong)} shape mismatches, e.g. {k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
            )
        raise ModelLoadError(
            f"model {config.name!r}: the weights do not fit {config.arch} with {len(own)} tensors "
            f"({'; '.join(problems)}); check arch, arch_params and num_classes in model.toml"
        )
    module.load_state_dict(state)


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return f"{len(keys)} keys ({shown}{', ...' if len(keys) > 3 else ''})"


def short(exc: BaseException) -> str:
    """An exception's first line, short enough for a one-line start-up error."""
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]
