"""One served model: its module, labels and preprocessing, and the batcher in front of its forward pass."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from app.batcher import Batcher, BatchRecord
from app.decode import decode
from app.device import dtype_name
from app.loading import LoadedModel
from app.postprocess import ImageOutput
from app.preprocess import build_preprocessor, preprocess
from app.settings import BatchingConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelInfo:
    name: str
    arch: str
    weights: str
    num_params: int
    input_size: list[int]
    num_classes: int
    device: str
    dtype: str
    batching: dict[str, Any]
    preprocess: dict[str, Any]
    ready: bool


class ServedModel:
    """Decode and preprocess run on the caller's threads (`prepare`); the forward runs on the batcher's thread."""

    def __init__(
        self,
        name: str,
        arch: str,
        loaded: LoadedModel,
        *,
        device: torch.device,
        dtype: torch.dtype,
        batching: BatchingConfig,
    ) -> None:
        self.name = name
        self.arch = arch
        self.labels = loaded.labels
        self._loaded = loaded
        self._module: nn.Module = loaded.module
        self._preprocessor = build_preprocessor(loaded.preprocess)
        self._device = device
        self._dtype = dtype
        self.on_batch: Callable[[BatchRecord], None] | None = None
        self.oom_splits = 0  # batches retried in halves after running out of device memory
        self.batcher: Batcher[torch.Tensor, ImageOutput] = Batcher(
            self.forward, batching, name=name, on_batch=self._batch_done
        )

    def _batch_done(self, record: BatchRecord) -> None:
        if self.on_batch is not None:
            self.on_batch(record)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def on_gpu(self) -> bool:
        return self._device.type == "cuda"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """One preprocessed image: (3, h, w)."""
        size = self._loaded.image_size
        return (3, size, size)

    @property
    def ready(self) -> bool:
        return self.batcher.alive

    def prepare(self, data: bytes, max_pixels: int) -> torch.Tensor:
        """Decode and preprocess one image: bytes -> (3, crop, crop) float32. Runs in the decode pool."""
        return preprocess(decode(data, max_pixels=max_pixels), self._preprocessor)

    def forward(self, images: list[torch.Tensor]) -> list[ImageOutput]:
        """Run one batch: n x (3, h, w) -> n outputs of (num_classes,). Runs on the inference thread.

        Out of device memory, the batch is retried in two halves (and so on down to one image) before it fails:
        a batch that fits at 16 but not at 32 is still answered, slower, instead of failing 32 requests.
        """
        try:
            return self._forward(images)
        except torch.OutOfMemoryError:
            if len(images) == 1:
                raise
            self.oom_splits += 1
            log.warning(
                "model %r: out of memory on a batch of %d; retrying it in two halves",
                self.name,
                len(images),
                extra={"fields": {"model": self.name, "batch_size": len(images)}},
            )
            if self.on_gpu:
                torch.cuda.empty_cache()
            half = len(images) // 2
            return self.forward(images[:half]) + self.forward(images[half:])

    def _forward(self, images: list[torch.Tensor]) -> list[ImageOutput]:
        with torch.inference_mode():
            batch = torch.stack(images).to(self._device, self._dtype, non_blocking=True)  # (n, 3, h, w)
            logits = self._module(batch).float()  # (n, num_classes)
            probs = logits.softmax(dim=-1)
            logits, probs = logits.cpu(), probs.cpu()
        return [ImageOutput(logits=logits[i], probs=probs[i]) for i in range(len(images))]

    def warmup_batch(self) -> list[torch.Tensor]:
        """A batch of the largest size the batcher sends, of random images."""
        size = self._loaded.image_size
        generator = torch.Generator().manual_seed(0)
        shape = (3, size, size)
        return [torch.randn(shape, generator=generator) for _ in range(self.batcher.config.max_batch_size)]

    async def start(self) -> None:
        await self.batcher.start(warmup=self.warmup_batch())

    async def stop(self, timeout_s: float) -> None:
        await self.batcher.stop(timeout_s)

    def info(self) -> ModelInfo:
        size = self._loaded.image_size
        return ModelInfo(
            name=self.name,
            arch=self.arch,
            weights=self._loaded.weights_source,
            num_params=self._loaded.num_params,
            input_size=[3, size, size],
            num_classes=self.num_classes,
            device=str(self._device),
            dtype=dtype_name(self._dtype),
            batching=self.batcher.config.model_dump(),
            preprocess=self._loaded.preprocess.as_dict(),
            ready=self.ready,
        )
