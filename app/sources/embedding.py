"""A ViT split at its head: one forward gives the logits and the image's embedding (the representation the head reads).

`with_embedding(module)` wraps a served model as `pixels -> [logits | embedding]`, one (n, num_classes + dim) tensor,
so that compiled and CUDA-graphed forwards still have a single output and nothing runs twice. The embedding is:
- torchvision `VisionTransformer`: the class token's output of the encoder (after its final LayerNorm), before
  `heads` (which may hold a pre-logits layer);
- Hugging Face `ViTForImageClassification`: the same, `last_hidden_state[:, 0]`, before `classifier`;
- timm models: `forward_head(forward_features(x), pre_logits=True)`, what `get_classifier()` reads (the pooled,
  normalised features); checked once against the model's own forward, since timm has many architectures.
A model none of these fit is served without embeddings (`with_embedding` returns None).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

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


class TorchvisionFeatures(nn.Module):
    """torchvision's `VisionTransformer.forward` up to its heads: the class token after the encoder."""

    def __init__(self, vit: VisionTransformer) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        vit = self.vit
        tokens = vit._process_input(pixels)
        class_token = vit.class_token.expand(tokens.shape[0], -1, -1)
        encoded: torch.Tensor = vit.encoder(torch.cat([class_token, tokens], dim=1))
        return encoded[:, 0]


class HFViTFeatures(nn.Module):
    """A Transformers `ViTForImageClassification` up to its classifier: `last_hidden_state[:, 0]`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        model: Any = self.model
        hidden: torch.Tensor = model.vit(pixel_values=pixels).last_hidden_state
        return hidden[:, 0]


class TimmFeatures(nn.Module):
    """A timm model up to its classifier: `forward_head(forward_features(x), pre_logits=True)`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        model: Any = self.model
        features: torch.Tensor = model.forward_head(model.forward_features(pixels), pre_logits=True)
        return features


def with_embedding(module: nn.Module, image_size: int) -> WithEmbedding | None:
    """`module` (on its device, in eval mode) as logits + embedding, or None when its head cannot be found."""
    if isinstance(module, VisionTransformer):
        return WithEmbedding(TorchvisionFeatures(module), module.heads, module.hidden_dim)
    inner = getattr(module, "model", None)  # app.sources.hf_models.LogitsOf wraps the Transformers model
    if inner is not None and hasattr(inner, "vit") and isinstance(getattr(inner, "classifier", None), nn.Module):
        return WithEmbedding(HFViTFeatures(inner), inner.classifier, int(inner.config.hidden_size))
    if hasattr(module, "forward_head") and hasattr(module, "get_classifier"):
        dim = int(getattr(module, "head_hidden_size", getattr(module, "num_features", 0)))
        wrapped = WithEmbedding(TimmFeatures(module), module.get_classifier(), dim)  # type: ignore[operator]
        return wrapped if dim and _same_logits(module, wrapped, image_size) else None
    return None


def _same_logits(module: nn.Module, wrapped: WithEmbedding, image_size: int) -> bool:
    """Whether the split model gives the model's own logits (and an embedding of its stated size) on a test input."""
    parameter = next(module.parameters())
    pixels = torch.randn((1, 3, image_size, image_size), generator=torch.Generator().manual_seed(0))
    pixels = pixels.to(parameter.device, parameter.dtype)
    with torch.inference_mode():
        expected = module(pixels).float()
        both = wrapped(pixels).float()
    classes = expected.shape[1]
    fits = both.shape == (1, classes + wrapped.dim) and torch.allclose(
        both[:, :classes], expected, atol=1e-3, rtol=1e-3
    )
    if not fits:
        log.warning("%s: its head could not be split off; served without embeddings", type(module).__name__)
    return fits
