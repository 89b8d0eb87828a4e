"""A model split at its head: one forward gives the logits and the image's embedding (what the head reads).

A source's `split_head` wraps a served model as `pixels -> [logits | embedding]`, one (n, num_classes + dim) tensor,
so that compiled and CUDA-graphed forwards still have a single output and nothing runs twice.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)


class WithEmbedding(nn.Module):
    """`pixels -> cat([head(features(pixels)), features(pixels)], dim=1)`: logits first, then the embedding."""

    def __init__(self, features: nn.Module, head: nn.Module, dim: int) -> None:
        super().__init__()
        self.features = features
        self.head = head
        self.dim = dim

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        embedding = self.features(pixels)
        return torch.cat([self.head(embedding), embedding], dim=1)


def gives_own_logits(module: nn.Module, split: WithEmbedding, image_size: int) -> bool:
    """Whether `split` gives `module`'s own logits (and an embedding of its stated size) on a test input: for sources
    whose split is found by the model's methods rather than known from its class."""
    parameter = next(module.parameters())
    pixels = torch.randn((1, 3, image_size, image_size), generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(parameter.device, parameter.dtype)
    with torch.inference_mode():
        expected = module(pixels).float()
        both = split(pixels).float()
    classes = expected.shape[1]
    fits = both.shape == (1, classes + split.dim) and torch.allclose(both[:, :classes], expected, atol=1e-3, rtol=1e-3)
    if not fits:
        log.warning("%s: its head could not be split off; served without embeddings", type(module).__name__)
    return fits
