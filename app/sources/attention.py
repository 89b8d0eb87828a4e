"""Explain: a ViT's self-attention in one forward pass -> an attention-rollout map (the PNG overlay: `overlay`).

Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"), exactly as `rollout` does it:

1. each layer's post-softmax weights (n, heads, T, T) are averaged over the heads (mean);
2. the residual connection is added as Ã = residual·I + (1 - residual)·A, and each row of Ã renormalized to sum 1;
3. rollout = Ã_L · … · Ã_2 · Ã_1 (the last layer on the left), in float64;
4. the map is the class token's row (row 0) over the patch tokens (the prefix tokens dropped), renormalized to
   sum 1 and reshaped to the patch grid (rows, cols), row-major as the patches were flattened.

Each source reads its own models' attention (`ModelSource.attention` gives an `AttentionReader`): it runs the model's
own submodules in the model's own order, so its logits are the model's logits, and computes each layer's weights on the
side; it never changes the module (no hooks, no flags), because other threads may be running classification batches
through it at the same time. This module holds what is common to them: the reader, the rollout, and the checks that a
module is one whose forward the reader replays.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class Attentions:
    """One forward pass of a batch: its logits and every layer's attention, float32 on the module's device."""

    logits: torch.Tensor  # (n, num_classes), the model's classification logits from this same forward
    layers: list[torch.Tensor]  # one per encoder layer: (n, heads, T, T), post-softmax attention weights
    prefix_tokens: int  # tokens before the patch tokens (class token; + registers/distillation token)
    grid: tuple[int, int]  # (rows, cols) of the patch grid, rows * cols == T - prefix_tokens


# The model objects are third-party modules reached by attribute: typed `Any`, checked by the source first.
Read = Callable[[Any, torch.Tensor], Attentions]


class AttentionReader:
    """Reads one module's attention: `reader(pixels)` runs the batch through the module once, keeping every layer's
    weights. A source gives one for a module whose forward `read` replays exactly."""

    def __init__(self, module: nn.Module, read: Read) -> None:
        self.module = module
        self._read = read

    def __call__(self, pixels: torch.Tensor) -> Attentions:
        """(n, 3, h, w) pixels, moved to the module's device and dtype -> the logits (equal to `module(pixels)`) and
        every layer's weights, all float32 on the module's device."""
        if pixels.ndim != 4:
            raise ValueError(f"expected pixels of shape (n, 3, h, w), got {tuple(pixels.shape)}")
        parameter = next(self.module.parameters())
        with torch.inference_mode():
            return self._read(self.module, pixels.to(device=parameter.device, dtype=parameter.dtype))


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


def unmodified(obj: object, cls: type | None, *methods: str) -> bool:
    """`obj` is a `cls` whose `methods` are `cls`'s own, not a subclass's: a forward a reader can replay."""
    return cls is not None and isinstance(obj, cls) and all(getattr(type(obj), m) is getattr(cls, m) for m in methods)


def loaded_class(module_name: str, name: str) -> type | None:
    """A class of an optional library if that library is loaded (a module built with it means it is): no import."""
    cls = getattr(sys.modules.get(module_name), name, None)
    return cls if isinstance(cls, type) else None


def softmax_weights(query: torch.Tensor, key: torch.Tensor, scale: float) -> torch.Tensor:
    """(n, heads, T, d) queries and keys -> (n, heads, T, T) attention weights, in float32 whatever the model's."""
    return (query.float() @ key.float().transpose(-2, -1) * scale).softmax(dim=-1)
