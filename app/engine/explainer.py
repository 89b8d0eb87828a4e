"""A model's explanations: attention rollout through an eager forward that keeps every layer's attention, in a queue
of its own, so the classify path (graphed or compiled, one output) is untouched by them; and the overlay PNG."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from app.config.settings import BatchingConfig
from app.engine.batcher import Batcher
from app.pipeline import overlay
from app.pipeline.postprocess import ImageOutput
from app.sources.attention import AttentionReader, rollout
from app.sources.base import Preprocessing

EXPLAIN_MAX_BATCH = 8  # attention weights of every layer are kept for a whole batch: (n, heads, T, T) per layer


@dataclass(frozen=True, slots=True)
class Explained:
    """One image through the attention-reading forward: its outputs, its rollout map, and the pixels it saw."""

    output: ImageOutput
    heat: torch.Tensor  # (rows, cols) float32, summing to 1
    pixels: torch.Tensor  # (3, h, w) preprocessed


class Explainer:
    """Explanations of one served model, through the same weights, batched by a `Batcher` of their own (at most
    `EXPLAIN_MAX_BATCH` images a batch)."""

    def __init__(
        self,
        name: str,
        attention: AttentionReader,
        preprocessing: Preprocessing,
        *,
        device: torch.device,
        dtype: torch.dtype,
        batching: BatchingConfig,
    ) -> None:
        self._attention = attention
        self._preprocessing = preprocessing
        self._device = device
        self._dtype = dtype
        explain_batching = batching.model_copy(
            update={"max_batch_size": min(batching.max_batch_size, EXPLAIN_MAX_BATCH)}
        )
        self.batcher: Batcher[torch.Tensor, Explained] = Batcher(self.explain, explain_batching, name=f"{name}/explain")

    def explain(self, images: list[torch.Tensor]) -> list[Explained]:
        """One batch through the attention-reading forward: outputs and rollout maps. On the batcher's thread."""
        with torch.inference_mode():
            pixels = torch.stack(images).to(self._device, self._dtype)
            found = self._attention(pixels)
            maps = rollout(found.layers, found.prefix_tokens, found.grid).float().cpu()
            logits = found.logits.float().cpu()
        probs = logits.softmax(dim=-1)
        empty = torch.empty(0)
        return [
            Explained(ImageOutput(logits=logits[i], probs=probs[i], embedding=empty), maps[i], images[i])
            for i in range(len(images))
        ]

    def overlay_png(self, explained: Explained) -> bytes:
        """The rollout map laid over the image the model saw (resized, cropped), as a PNG."""
        view = overlay.model_view(explained.pixels, self._preprocessing.mean, self._preprocessing.std)
        return overlay.overlay_png(view, explained.heat)
