"""`arch = "vit_b_16"` (or another torchvision ViT) or `"vit"` with `[arch_params]`: torchvision's `VisionTransformer`.

Weights are a torchvision weights name (`IMAGENET1K_V1`: downloaded through torchvision's URL and hash check, once, into
the cache), a local state_dict file, or `random`. The preprocessing is the preset the weights ship (their
`transforms()`), or torchvision's ratio (resize 256, crop 224) at the model's input size, overridden field by field by
`[preprocess]`. Embeddings are the class token after the encoder (before `heads`); explanations read each encoder
block's `self_attention`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import Weights, get_model, get_model_weights
from torchvision.models.vision_transformer import Encoder, EncoderBlock, VisionTransformer

from app.config.model_config import ModelConfig
from app.errors import ModelLoadError
from app.pipeline.preprocess import PreprocessParams, preset_params
from app.sources.attention import AttentionReader, Attentions, unmodified
from app.sources.base import LoadedModel, ModelSource, Preprocessing
from app.sources.checkpoints import HINT, RANDOM, load_state_dict, load_weights_file, random_model, short
from app.sources.embedding import WithEmbedding
from app.sources.labels import load_labels

ARCHS = ("vit_b_16", "vit_b_32", "vit_l_16", "vit_l_32", "vit_h_14")
CUSTOM = "vit"  # a VisionTransformer of the sizes in [arch_params]


class TorchvisionSource(ModelSource):
    archs = ", ".join(ARCHS) + f', "{CUSTOM}"'

    def handles(self, arch: str) -> bool:
        return arch == CUSTOM or arch in ARCHS

    def check(self, config: ModelConfig) -> None:
        if config.weights is None:
            raise self.refuse(config, "missing key 'weights'")
        if config.arch == CUSTOM and config.arch_params is None:
            raise self.refuse(config, f'arch = "{CUSTOM}" needs an [arch_params] table')
        if config.arch != CUSTOM and config.arch_params is not None:
            raise self.refuse(
                config, f'[arch_params] is only for arch = "{CUSTOM}"; {config.arch} has fixed parameters'
            )

    def load(self, config: ModelConfig, *, cache_dir: Path | None) -> LoadedModel:
        labels = load_labels(config)
        pretrained = _pretrained_weights(config)
        if config.weights == RANDOM:
            module = random_model(config, lambda: _build(config, num_classes=len(labels), pretrained=None), len(labels))
            source = RANDOM
        else:
            module = _build(config, num_classes=len(labels), pretrained=pretrained)
            if pretrained is not None:
                load_state_dict(config, module, _download(config, pretrained, cache_dir))
                source = f"torchvision:{config.arch}.{pretrained.name}"
            else:
                path = config.resolve(_weights(config))
                load_weights_file(config, module, path)
                source = str(path)
        image_size = int(getattr(module, "image_size", 224))
        params = _preprocess_params(config, pretrained, image_size)
        if params.crop_size != image_size:
            raise ModelLoadError(
                f"model {config.name!r}: preprocess crop_size = {params.crop_size} but the model takes "
                f"{image_size}x{image_size} images; make them equal"
            )
        return LoadedModel.of(module, labels, Preprocessing.of_preset(params), source)

    def download(self, config: ModelConfig, cache_dir: Path | None) -> Path | None:
        pretrained = _pretrained_weights(config)
        if pretrained is None:
            return None
        _download(config, pretrained, cache_dir)
        folder = cache_dir if cache_dir is not None else Path(torch.hub.get_dir()) / "checkpoints"
        return folder / Path(urlparse(pretrained.url).path).name

    def split_head(self, module: nn.Module, image_size: int) -> WithEmbedding | None:
        if not unmodified(module, VisionTransformer, "forward"):
            return None
        return WithEmbedding(EncodedClassToken(module), module.heads, module.hidden_dim)  # type: ignore[arg-type]

    def attention(self, module: nn.Module) -> AttentionReader | None:
        readable = (
            unmodified(module, VisionTransformer, "forward")
            and unmodified(encoder := module.encoder, Encoder, "forward")
            and all(unmodified(block, EncoderBlock, "forward") for block in encoder.layers)  # type: ignore[union-attr]
        )
        return AttentionReader(module, _read_attention) if readable else None


def _patch_tokens(vit: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """torchvision's patch embedding, from its public modules: (n, 3, h, w) -> (n, rows * cols, hidden)."""
    patches: torch.Tensor = vit.conv_proj(pixels)  # (n, 3, h, w) -> (n, hidden, rows, cols)
    return patches.flatten(2).transpose(1, 2)  # -> (n, hidden, rows * cols) -> (n, rows * cols, hidden)


def _with_class_token(vit: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    return torch.cat(
        [vit.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1
    )  # -> (n, 1 + rows * cols, hidden)


class EncodedClassToken(nn.Module):
    """torchvision's `VisionTransformer.forward` up to its heads: the class token after the encoder (and its norm)."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        encoded: torch.Tensor = self.vit.encoder(_with_class_token(self.vit, _patch_tokens(self.vit, pixels)))
        return encoded[:, 0]


def _read_attention(vit: Any, pixels: torch.Tensor) -> Attentions:
    """torchvision's `VisionTransformer.forward`, layer by layer, asking each attention for its per-head weights."""
    tokens = _with_class_token(vit, _patch_tokens(vit, pixels))
    encoder = vit.encoder
    tokens = encoder.dropout(tokens + encoder.pos_embedding)
    layers = []
    for block in encoder.layers:
        normed = block.ln_1(tokens)
        attended, weights = block.self_attention(
            normed, normed, normed, need_weights=True, average_attn_weights=False
        )  # weights: (n, heads, T, T)
        layers.append(weights.float())
        tokens = tokens + block.dropout(attended)
        tokens = tokens + block.mlp(block.ln_2(tokens))
    logits = vit.heads(encoder.ln(tokens)[:, 0])
    side = vit.image_size // vit.patch_size
    return Attentions(logits.float(), layers, 1, (side, side))


def _weights(config: ModelConfig) -> str:
    assert config.weights is not None  # checked when the config was read
    return config.weights


def _pretrained_weights(config: ModelConfig) -> Weights | None:
    """The torchvision weights enum member that `config.weights` names, if it names one."""
    weights = _weights(config)
    if config.arch == CUSTOM or weights == RANDOM:
        return None
    members = get_model_weights(config.arch).__members__
    if weights in members:
        member: Weights = members[weights]
        return member
    if not Path(weights).suffix:
        raise ModelLoadError(
            f"model {config.name!r}: weights {weights!r} is not a torchvision weights name for "
            f"{config.arch} ({', '.join(members)}), a file, or `random`"
        )
    return None


def _build(config: ModelConfig, *, num_classes: int, pretrained: Weights | None) -> nn.Module:
    if config.arch == CUSTOM:
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
            f"({short(exc)}); {HINT}"
        ) from exc


def _preprocess_params(config: ModelConfig, pretrained: Weights | None, image_size: int) -> PreprocessParams:
    base = (
        PreprocessParams(**preset_params(pretrained.transforms))
        if pretrained is not None
        else PreprocessParams.for_image_size(image_size)
    )
    return base.with_overrides(config.preprocess.model_dump(exclude_none=True))
