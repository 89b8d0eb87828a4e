"""Stage 5, top-k: one image's logits -> its best classes with softmax scores; and embeddings as one array."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import numpy as np
import torch
from pydantic import Field


@dataclass(frozen=True, slots=True)
class ImageOutput:
    """What the forward pass gives one image: float32 CPU rows of `num_classes`, and its embedding (empty for a model
    served without one)."""

    logits: torch.Tensor
    probs: torch.Tensor
    embedding: torch.Tensor


@dataclass(frozen=True, slots=True)
class ClassScore:
    """One of an image's best classes."""

    # The API's answers carry and document this very type: its field annotations are what /openapi.json says.
    index: Annotated[int, Field(examples=[281])]
    label: Annotated[str, Field(examples=["tabby"])]
    score: Annotated[float, Field(description="Softmax probability.", examples=[0.91])]


@dataclass(frozen=True, slots=True)
class Prediction:
    top_k: list[ClassScore]
    logits: np.ndarray | None  # float32 (num_classes,), None when not asked for


def top_k(output: ImageOutput, k: int, labels: list[str], *, with_logits: bool) -> Prediction:
    scores, indices = output.probs.topk(k)  # sorted, best first
    best = [
        ClassScore(index=i, label=labels[i], score=s) for i, s in zip(indices.tolist(), scores.tolist(), strict=True)
    ]
    return Prediction(top_k=best, logits=output.logits.numpy() if with_logits else None)


def embeddings(rows: list[torch.Tensor], *, normalize: bool) -> np.ndarray:
    """Images' embeddings -> one (n, dim) float32 array; each row scaled to unit L2 norm with `normalize`."""
    stacked = torch.stack(rows)
    if normalize:
        stacked = torch.nn.functional.normalize(stacked, dim=1)
    return stacked.numpy()
