"""Explain: a ViT's self-attention in one forward pass -> an attention-rollout map (the PNG overlay: `overlay`).

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"), exactly as `rollout` does it:

1. each layer's post-softmax weights (n, heads, T, T) are averaged over the heads (mean);
2. the residual connection is added as Ã = residual·I + (1 - residual)·A, and each row of Ã renormalized to sum 1;
3. rollout = Ã_L · … · Ã_2 · Ã_1 (the last layer on the left), in float64;
4. the map is the class token's row (row 0) over the patch tokens (the prefix tokens dropped), renormalized to
   sum 1 and reshaped to the patch grid (rows, cols), row-major as the patches were flattened.

Three sources are supported: torchvision's `VisionTransformer`, a Hugging Face `ViTForImageClassification` wrapped
in `app.sources.hf_models.LogitsOf`, and a timm `VisionTransformer` with a class token and `global_pool="token"`.
`attentions` runs the model's own submodules in the model's own order, so its logits are the model's logits, and
computes each layer's weights on the side; it never changes the module (no hooks, no flags), because other threads
may be running classification batches through it at the same time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.models.vision_transformer import Encoder, EncoderBlock, VisionTransformer

from app.sources.hf_models import LogitsOf


@dataclass(frozen=True, slots=True)
class Attentions:
    """One forward pass of a batch: its logits and every layer's attention, float32 on the module's device."""

    logits: torch.Tensor  # (n, num_classes), the model's classification logits from this same forward
    layers: list[torch.Tensor]  # one per encoder layer: (n, heads, T, T), post-softmax attention weights
    prefix_tokens: int  # tokens before the patch tokens (class token; + registers/distillation token)
    grid: tuple[int, int]  # (rows, cols) of the patch grid, rows * cols == T - prefix_tokens


# The model objects below are third-party modules reached by attribute: typed `Any`, checked by `_extractor`.
Extractor = Callable[[Any, torch.Tensor], Attentions]


def supports_attention(module: nn.Module) -> bool:
    """Whether `attentions` can explain this module (one of the three supported ViT sources, unmodified forward)."""
    return _extractor(module) is not None


def attentions(module: nn.Module, pixels: torch.Tensor) -> Attentions:
    """Run `pixels` (n, 3, h, w) through `module` once, keeping every layer's attention weights.

    The input is moved to the module's device and dtype; the logits equal `module(pixels)`. Everything returned is
    float32 on the module's device. Raises `ValueError` for a module `supports_attention` rejects.
    """
    extract = _extractor(module)
    if extract is None:
        raise ValueError(
            f"cannot explain a {type(module).__name__}: attention rollout needs a torchvision VisionTransformer, a "
            "Hugging Face ViTForImageClassification or a timm VisionTransformer with a class token"
        )
    if pixels.ndim != 4:
        raise ValueError(f"expected pixels of shape (n, 3, h, w), got {tuple(pixels.shape)}")
    parameter = next(module.parameters())
    with torch.inference_mode():
        return extract(module, pixels.to(device=parameter.device, dtype=parameter.dtype))


def rollout(
    layers: Sequence[torch.Tensor], prefix_tokens: int, grid: tuple[int, int], *, residual: float = 0.5
) -> torch.Tensor:
    """Attention rollout of (n, heads, T, T) weights -> (n, rows, cols) float32 maps, each non-negative, summing to 1.

    The rules are the module docstring's. A map whose class-token row puts no mass on any patch (only possible with
    degenerate weights) is returned uniform.
    """
    if not layers:
        raise ValueError("rollout needs at least one layer of attention weights")
    if not 0.0 <= residual < 1.0:
        raise ValueError(f"residual must be in [0, 1), got {residual}")
    n, _, tokens, _ = layers[0].shape
    rows, cols = grid
    if prefix_tokens < 1 or rows * cols != tokens - prefix_tokens:
        raise ValueError(f"{tokens} tokens are not {prefix_tokens} prefix token(s) (>= 1) and a {rows}x{cols} grid")
    eye = torch.eye(tokens, dtype=torch.float64, device=layers[0].device)
    flow = eye.expand(n, tokens, tokens)
    for weights in layers:
        if weights.ndim != 4 or weights.shape[0] != n or weights.shape[2:] != (tokens, tokens):
            raise ValueError(f"every layer must be (n={n}, heads, {tokens}, {tokens}), got {tuple(weights.shape)}")
        heads_mean = weights.to(torch.float64).mean(dim=1)  # (n, heads, T, T) -> (n, T, T)
        mixed = residual * eye + (1.0 - residual) * heads_mean
        mixed = mixed / mixed.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        flow = mixed @ flow
    patches = flow[:, 0, prefix_tokens:]  # (n, T, T) -> (n, rows * cols)
    total = patches.sum(dim=-1, keepdim=True)
    maps = torch.where(total > 0, patches / total.clamp_min(torch.finfo(torch.float64).tiny), 1.0 / (rows * cols))
    return maps.reshape(n, rows, cols).float()


def _extractor(module: nn.Module) -> Extractor | None:
    if _is_torchvision_vit(module):
        return _torchvision
    if isinstance(module, LogitsOf) and _is_hf_vit(module.model):
        return _hf
    if _is_timm_vit(module):
        return _timm
    return None


def _same(obj: object, cls: type | None, *methods: str) -> bool:
    """`obj` is a `cls` whose `methods` are `cls`'s own (not overridden by a subclass)."""
    return cls is not None and isinstance(obj, cls) and all(getattr(type(obj), m) is getattr(cls, m) for m in methods)


def _optional_class(module_name: str, name: str) -> type | None:
    """A class of an optional library if that library is loaded (a module built with it means it is): no import."""
    cls = getattr(sys.modules.get(module_name), name, None)
    return cls if isinstance(cls, type) else None


def _softmax_weights(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """(n, heads, T, d) queries and keys -> (n, heads, T, T) attention weights, in float32 whatever the model's."""
    return (query.float() @ key.float().transpose(-2, -1) * scale).softmax(dim=-1)


def _is_torchvision_vit(module: Any) -> bool:
    return (
        _same(module, VisionTransformer, "forward")
        and _same(module.encoder, Encoder, "forward")
        and all(_same(block, EncoderBlock, "forward") for block in module.encoder.layers)
    )


def _torchvision(vit: Any, pixels: torch.Tensor) -> Attentions:
    """torchvision's `VisionTransformer.forward`, layer by layer, asking each attention for its per-head weights."""
    tokens = vit._process_input(pixels)  # (n, 3, h, w) -> (n, rows * cols, hidden)
    tokens = torch.cat([vit.class_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
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


def _is_hf_vit(model: Any) -> bool:
    vit_module = "transformers.models.vit.modeling_vit"
    classifier = _optional_class(vit_module, "ViTForImageClassification")
    if not _same(model, classifier, "forward") or not _same(
        vit := model.vit, _optional_class(vit_module, "ViTModel"), "forward"
    ):
        return False
    layer_class, attention_class = _optional_class(vit_module, "ViTLayer"), _optional_class(vit_module, "ViTAttention")
    return isinstance(vit.layers, nn.ModuleList) and all(
        _same(layer, layer_class, "forward")
        and _same(layer.attention, attention_class, "forward")
        and all(hasattr(layer.attention, name) for name in ("q_proj", "k_proj", "head_dim", "scaling"))
        for layer in vit.layers
    )


def _hf(logits_of: Any, pixels: torch.Tensor) -> Attentions:
    """`ViTForImageClassification.forward` (no mask, no position interpolation), layer by layer; weights on the side."""
    model = logits_of.model
    vit = model.vit
    patches = vit.embeddings.patch_embeddings
    tokens = vit.embeddings(pixels.to(patches.projection.weight.dtype))  # (n, 3, h, w) -> (n, 1 + rows * cols, hidden)
    layers = []
    for layer in vit.layers:
        attention = layer.attention
        normed = layer.layernorm_before(tokens)
        heads = (*normed.shape[:-1], -1, attention.head_dim)
        query = attention.q_proj(normed).view(heads).transpose(1, 2)  # (n, T, hidden) -> (n, heads, T, head_dim)
        key = attention.k_proj(normed).view(heads).transpose(1, 2)
        layers.append(_softmax_weights(query, key, attention.scaling))
        tokens = layer(tokens)
    logits = model.classifier(vit.layernorm(tokens)[:, 0, :])
    grid = (patches.image_size[0] // patches.patch_size[0], patches.image_size[1] // patches.patch_size[1])
    return Attentions(logits.float(), layers, 1, grid)


def _is_timm_vit(module: Any) -> bool:
    vit_module = "timm.models.vision_transformer"
    if not _same(module, _optional_class(vit_module, "VisionTransformer"), "forward", "forward_features"):
        return False
    if module.cls_token is None or module.global_pool != "token" or module.attn_pool is not None:
        return False  # the map is the class token's row, so the class token must be what is classified
    blocks = (_optional_class(vit_module, "Block"), _optional_class(vit_module, "ResPostBlock"))
    attention = _optional_class(vit_module, "Attention")
    return all(
        any(_same(block, cls, "forward") for cls in blocks) and _same(block.attn, attention, "forward")
        for block in module.blocks
    )


def _timm(vit: Any, pixels: torch.Tensor) -> Attentions:
    """timm's `forward_features` + `forward_head`, block by block; each block's weights from its own qkv on the side."""
    tokens = vit.patch_embed(pixels)  # (n, rows * cols, dim), or (n, rows, cols, dim) with a dynamic image size
    grid = (tokens.shape[1], tokens.shape[2]) if tokens.ndim == 4 else tuple(vit.patch_embed.grid_size)
    tokens = vit.norm_pre(vit.patch_drop(vit._pos_embed(tokens)))  # -> (n, prefix + rows * cols, dim)
    res_post = _optional_class("timm.models.vision_transformer", "ResPostBlock")
    layers = []
    for block in vit.blocks:
        attention = block.attn
        normed = tokens if res_post is not None and isinstance(block, res_post) else block.norm1(tokens)
        n, length, _ = normed.shape
        # (n, T, 3 * heads * head_dim) -> (3, n, heads, T, head_dim)
        qkv = attention.qkv(normed).reshape(n, length, 3, attention.num_heads, attention.head_dim)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        layers.append(_softmax_weights(attention.q_norm(qkv[0]), attention.k_norm(qkv[1]), attention.scale))
        tokens = block(tokens)
    logits = vit.forward_head(vit.norm(tokens))
    return Attentions(logits.float(), layers, int(vit.num_prefix_tokens), (int(grid[0]), int(grid[1])))
