"""`arch = "timm:<model name>"`: a timm model (`vit_small_patch16_224`, DeiT, EVA, ...) with a local weights file.

The model is built by `timm.create_model(name, pretrained=False, num_classes=...)` (nothing downloaded) and the file's
state_dict loaded into it (or `weights = "random"`); its preprocessing is timm's own evaluation transform for that model
(`resolve_data_config` + `create_transform`). Embeddings are `forward_head(forward_features(x), pre_logits=True)`, what
the classifier reads, checked once against the model's own forward since timm has many architectures; explanations
are read from a `VisionTransformer` that classifies its class token. Needs the `timm` extra:
`pip install 'vit-serve[timm]'`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.config.model_config import ModelConfig, PreprocessConfig
from app.errors import ModelLoadError
from app.sources.attention import AttentionReader, Attentions, loaded_class, softmax_weights, unmodified
from app.sources.base import LoadedModel, ModelSource, Preprocessing
from app.sources.checkpoints import RANDOM, load_weights_file, random_model
from app.sources.embedding import WithEmbedding, gives_own_logits
from app.sources.extras import require
from app.sources.labels import load_labels

PREFIX = "timm:"
VIT_MODULE = "timm.models.vision_transformer"


class TimmSource(ModelSource):
    archs = f'"{PREFIX}<timm model name>"'

    def handles(self, arch: str) -> bool:
        return arch.startswith(PREFIX) and arch != PREFIX

    def check(self, config: ModelConfig) -> None:
        if config.weights is None:
            raise self.refuse(config, "missing key 'weights'")
        if config.arch_params is not None or config.preprocess != PreprocessConfig():
            raise self.refuse(
                config,
                f"{config.arch} models bring their own architecture and preprocessing; "
                "remove [arch_params] and [preprocess]",
            )

    def load(self, config: ModelConfig, *, cache_dir: Path | None) -> LoadedModel:
        timm = require("timm", "timm", "timm", config)
        labels = load_labels(config)
        name = config.arch.removeprefix(PREFIX)

        def build() -> nn.Module:
            try:
                module: nn.Module = timm.create_model(name, pretrained=False, num_classes=len(labels))
            except RuntimeError as exc:  # timm's "Unknown model"
                raise ModelLoadError(f"model {config.name!r}: timm has no model {name!r} ({exc})") from exc
            return module

        if config.weights == RANDOM:
            module = random_model(config, build, len(labels))
            source = RANDOM
        else:
            assert config.weights is not None  # checked when the config was read
            module = build()
            path = config.resolve(config.weights)
            load_weights_file(config, module, path)
            source = str(path)
        data_config = timm.data.resolve_data_config({}, model=module)
        info = {k: (list(v) if isinstance(v, tuple) else v) for k, v in data_config.items()}
        preprocessing = Preprocessing(
            timm.data.create_transform(**data_config),
            info,
            mean=tuple(float(v) for v in data_config["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data_config["std"]),  # type: ignore[arg-type]
            resize_side=_resize_side(data_config),
        )
        return LoadedModel.of(module, labels, preprocessing, f"{config.arch}:{source}")

    def split_head(self, module: nn.Module, image_size: int) -> WithEmbedding | None:
        if not hasattr(module, "forward_head") or not hasattr(module, "get_classifier"):
            return None
        dim = int(getattr(module, "head_hidden_size", getattr(module, "num_features", 0)))
        split = WithEmbedding(PreLogits(module), module.get_classifier(), dim)  # type: ignore[operator]
        return split if dim and gives_own_logits(module, split, image_size) else None

    def attention(self, module: nn.Module) -> AttentionReader | None:
        return AttentionReader(module, _read_attention) if _is_class_token_vit(module) else None


class PreLogits(nn.Module):
    """A timm model up to its classifier: `forward_head(forward_features(x), pre_logits=True)`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        model: Any = self.model
        features: torch.Tensor = model.forward_head(model.forward_features(pixels), pre_logits=True)
        return features


def _resize_side(data_config: dict[str, Any]) -> int | None:
    """timm's evaluation resize: the input side over `crop_pct`, before the center crop."""
    input_size, crop_pct = data_config.get("input_size"), data_config.get("crop_pct")
    if isinstance(input_size, tuple | list) and input_size and isinstance(crop_pct, float) and crop_pct > 0:
        return math.floor(int(max(input_size[1:] or input_size)) / crop_pct)
    return None


def _is_class_token_vit(module: Any) -> bool:
    """An unmodified timm `VisionTransformer` that classifies its class token, with blocks `_read_attention` replays."""
    if not unmodified(module, loaded_class(VIT_MODULE, "VisionTransformer"), "forward", "forward_features"):
        return False
    if module.cls_token is None or module.global_pool != "token" or module.attn_pool is not None:
        return False  # the map is the class token's row, so the class token must be what is classified
    blocks = (loaded_class(VIT_MODULE, "Block"), loaded_class(VIT_MODULE, "ResPostBlock"))
    attention = loaded_class(VIT_MODULE, "Attention")
    return all(
        any(unmodified(block, cls, "forward") for cls in blocks) and unmodified(block.attn, attention, "forward")
        for block in module.blocks
    )


def _read_attention(vit: Any, pixels: torch.Tensor) -> Attentions:
    """timm's `forward_features` + `forward_head`, block by block; each block's weights from its own qkv on the side.

    timm has no public step for the token sequence before the blocks, so this calls its `_pos_embed` as
    `forward_features` does."""
    tokens = vit.patch_embed(pixels)  # (n, rows * cols, dim), or (n, rows, cols, dim) with a dynamic image size
    grid = (tokens.shape[1], tokens.shape[2]) if tokens.ndim == 4 else tuple(vit.patch_embed.grid_size)
    tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(tokens)))  # -> (n, prefix + rows * cols, dim)
    res_post = loaded_class(VIT_MODULE, "ResPostBlock")
    layers = []
    for block in vit.blocks:
        attention = block.attn
        normed = tokens if res_post is not None and isinstance(block, res_post) else block.norm1(tokens)
        n, length, _ = normed.shape
        # (n, T, 3 * heads * head_dim) -> (3, n, heads, T, head_dim)
        qkv = attention.qkv(normed).reshape(n, length, 3, attention.num_heads, attention.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        layers.append(softmax_weights(attention.q_norm(qkv[0]), attention.k_norm(qkv[1]), attention.scale))
        tokens = block(tokens)
    logits = vit.forward_head(vit.norm(tokens))
    return Attentions(logits.float(), layers, int(vit.num_prefix_tokens), (int(grid[0]), int(grid[1])))
