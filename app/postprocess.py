"""Stage 5, top-k: one image's logits -> its best classes with softmax scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, slots=True)
class ImageOutput:
    """What the forward pass gives one image: float32 CPU rows of `num_classes`."""

    logits: torch.Tensor
    probs: torch.Tensor


@dataclass(frozen=True, slots=True)
class ClassScore:
    index: int
    label: str
    score: float


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
