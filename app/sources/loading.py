"""Start-up: a `ModelConfig` -> a torchvision ViT with its weights, labels and preprocessing, on its device."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from PIL import Image
from torch import nn
from torchvision.models import Weights, get_model, get_model_weights
from torchvision.models.vision_transformer import VisionTransformer

from app.config.model_config import ModelConfig
from app.errors import ModelLoadError
from app.pipeline.preprocess import Preprocessor, PreprocessParams, build_preprocessor, preset_params
from app.sources.labels import load_labels

log = logging.getLogger(__name__)

RANDOM = "random"
HINT = "set weights to a local file (model.toml or --weights / VIT_WEIGHTS), or `random` for a smoke test"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """A model ready to serve: the module in eval mode on its device, and what travels with its weights."""

    module: nn.Module
    labels: list[str]
    preprocessor: Preprocessor
    preprocess_info: dict[str, Any]
    image_size: int
    weights_source: str
    num_params: int
    # The preprocessor also takes (3, h, w) and (n, 3, h, w) uint8 tensors: JPEGs may decode on a GPU.
    tensor_preprocess: bool = True


def load_model(
    config: ModelConfig, *, device: torch.device, dtype: torch.dtype, cache_dir: Path | None = None
) -> LoadedModel:
    if config.arch == "hf":
        loaded = _load_hf(config)
    elif config.arch.startswith("timm:"):
        loaded = _load_timm(config)
    else:
        loaded = _load_torchvision(config, cache_dir)
    loaded.module.eval().requires_grad_(False).to(device=device, dtype=dtype)
    return loaded


def _load_torchvision(config: ModelConfig, cache_dir: Path | None) -> LoadedModel:
    labels = load_labels(config)
    pretrained = _pretrained_weights(config)
    if config.weights == RANDOM:
        module = _random_model(config, lambda: _build(config, num_classes=len(labels), pretrained=None), len(labels))
        source = RANDOM
    else:
        module = _build(config, num_classes=len(labels), pretrained=pretrained)
        if pretrained is not None:
            _load_state_dict(config, module, _download(config, pretrained, cache_dir))
            source = f"torchvision:{config.arch}.{pretrained.name}"
        else:
            path = config.resolve(config.weights)
            _load_state_dict(config, module, _read_state_dict(config, path))
            source = str(path)
    image_size = int(getattr(module, "image_size", 224))
    params = _preprocess_params(config, pretrained, image_size)
    if params.crop_size != image_size:
        raise ModelLoadError(
            f"model {config.name!r}: preprocess crop_size = {params.crop_size} but the model takes "
            f"{image_size}x{image_size} images; make them equal"
        )
    return _loaded(config, module, labels, build_preprocessor(params), params.as_dict(), source)


def _load_hf(config: ModelConfig) -> LoadedModel:
    from app.sources.hf_models import load_hf

    hf = load_hf(config)
    labels = load_labels(config) if config.labels is not None or hf.labels is None else hf.labels
    head = hf.module.model.config.num_labels  # type: ignore[union-attr]
    if len(labels) != head:
        raise ModelLoadError(f"model {config.name!r}: {len(labels)} labels for a model of {head} classes")
    return _loaded(config, hf.module, labels, hf.preprocessor, hf.preprocess_info, hf.source, tensor_preprocess=False)


def _load_timm(config: ModelConfig) -> LoadedModel:
    from app.sources.timm_models import TimmModel, build_timm

    labels = load_labels(config)
    built: list[TimmModel] = []

    def build() -> nn.Module:
        built.append(build_timm(config, len(labels)))
        return built[-1].module

    if config.weights == RANDOM:
        module = _random_model(config, build, len(labels))
        source = RANDOM
    else:
        module = build()
        path = config.resolve(config.weights)
        _load_state_dict(config, module, _read_state_dict(config, path))
        source = str(path)
    info = built[-1].preprocess_info
    preprocessor = built[-1].preprocessor
    return _loaded(config, module, labels, preprocessor, info, f"{config.arch}:{source}", tensor_preprocess=False)


def _loaded(
    config: ModelConfig,
    module: nn.Module,
    labels: list[str],
    preprocessor: Preprocessor,
    info: dict[str, Any],
    source: str,
    *,
    tensor_preprocess: bool = True,
) -> LoadedModel:
    if source.endswith(RANDOM):
        log.warning("model %r serves RANDOM weights: its predictions are meaningless", config.name)
    return LoadedModel(
        module=module,
        labels=labels,
        preprocessor=preprocessor,
        preprocess_info=info,
        image_size=_input_side(preprocessor),
        weights_source=source,
        num_params=sum(p.numel() for p in module.parameters()),
        tensor_preprocess=tensor_preprocess,
    )


def _input_side(preprocessor: Preprocessor) -> int:
    """The side of the square input the preprocessing gives (run once on a blank image)."""
    pixels = preprocessor(Image.new("RGB", (97, 83)))
    if pixels.dim() != 3 or pixels.shape[0] != 3 or pixels.shape[1] != pixels.shape[2]:
        raise ModelLoadError(f"preprocessing gives {list(pixels.shape)}; vit-serve serves square 3-channel inputs")
    return int(pixels.shape[1])


def download_pretrained(config: ModelConfig, cache_dir: Path | None = None) -> Path | None:
    """Fetch a model's pretrained weights into the cache, exactly as start-up would (same file, same hash check),
    without building the model: for image builds. None when its weights are a local file or random."""
    pretrained = _pretrained_weights(config)
    if pretrained is None:
        return None
    _download(config, pretrained, cache_dir)
    folder = cache_dir if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
    return folder / Path(urlparse(pretrained.url).path).name


def _pretrained_weights(config: ModelConfig) -> Weights | None:
    """The torchvision weights enum member that `config.weights` names, if it names one."""
    if config.arch == "vit" or config.weights == RANDOM:
        return None
    members = get_model_weights(config.arch).__members__
    if config.weights in members:
        weights: Weights = members[config.weights]
        return weights
    if not Path(config.weights).suffix:
        raise ModelLoadError(
            f"model {config.name!r}: weights {config.weights!r} is not a torchvision weights name for "
            f"{config.arch} ({', '.join(members)}), a file, or `random`"
        )
    return None


def _build(config: ModelConfig, *, num_classes: int, pretrained: Weights | None) -> nn.Module:
    if config.arch == "vit":
        assert config.arch_params is not None  # checked when the config was read
        module: nn.Module = VisionTransformer(**config.arch_params.model_dump(), num_classes=num_classes)
        return module
    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if pretrained is not None:
        # torchvision's builder sets the input size from the weights (e.g. 384 for the SWAG E2E weights).
        kwargs["image_size"] = pretrained.meta["min_size"][0]
        if num_classes != len(pretrained.meta["categories"]):
            raise ModelLoadError(
                f"model {config.name!r}: {config.weights} has {len(pretrained.meta['categories'])} classes "
                f"but the labels have {num_classes}"
            )
    built: nn.Module = get_model(config.arch, weights=None, **kwargs)
    return built


def _random_model(config: ModelConfig, build: Callable[[], nn.Module], num_classes: int) -> nn.Module:
    """Seeded, so every replica and restart serves the same random model; the head is drawn too, since
    torchvision initialises it to zeros (every logit 0), which would hide whether images reach the model."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        module = build()
        for layer in module.modules():
            if isinstance(layer, nn.Linear) and layer.out_features == num_classes:
                nn.init.normal_(layer.weight, std=0.5)
    return module


def _download(config: ModelConfig, weights: Weights, cache_dir: Path | None) -> dict[str, torch.Tensor]:
    """Pretrained weights through torchvision's own URL and hash check, cached; done once, at start-up."""
    model_dir = str(cache_dir) if cache_dir is not None else None
    try:
        state: dict[str, torch.Tensor] = torch.hub.load_state_dict_from_url(
            weights.url, model_dir=model_dir, progress=False, check_hash=True, weights_only=True
        )
        return state
    except (OSError, RuntimeError) as exc:
        raise ModelLoadError(
            f"model {config.name!r}: cannot download pretrained weights {config.arch}.{weights.name} "
            f"({_short(exc)}); {HINT}"
        ) from exc


def _read_state_dict(config: ModelConfig, path: Path) -> dict[str, torch.Tensor]:
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
            f"model {config.name!r}: cannot read weights {path} ({_short(exc)}); save a state_dict with "
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


def _load_state_dict(config: ModelConfig, module: nn.Module, state: dict[str, torch.Tensor]) -> None:
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


def _preprocess_params(config: ModelConfig, pretrained: Weights | None, image_size: int) -> PreprocessParams:
    base = (
        PreprocessParams(**preset_params(pretrained.transforms))
        if pretrained is not None
        else PreprocessParams.for_image_size(image_size)
    )
    return base.with_overrides(config.preprocess.model_dump(exclude_none=True))


def _few(keys: list[str]) -> str:
    shown = ", ".join(keys[:3])
    return f"{len(keys)} keys ({shown}{', ...' if len(keys) > 3 else ''})"


def _short(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:160]
