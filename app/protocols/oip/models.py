"""How each served model looks over OIP: its metadata and Triton model configuration.

Every served model `m` appears twice:
- `m`, input `IMAGE` (BYTES, one encoded image per batch element), decoded and preprocessed like `/v1`;
- `m_pixels`, input `PIXELS` (FP32 [N, 3, H, W], already preprocessed), for clients and load tools that send tensors.
Both have output `LOGITS` (FP32 [N, num_classes]) and, for a model with embeddings, `EMBEDDING` (FP32 [N, dim], the
representation its head reads, from the same forward); one version, "1"; the same model and batcher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.engine.descriptions import ModelInfo
from app.engine.facade import Engine
from app.errors import ModelNotFound

VERSION = "1"
PIXELS_SUFFIX = "_pixels"
IMAGE_INPUT = "IMAGE"
PIXELS_INPUT = "PIXELS"
LOGITS_OUTPUT = "LOGITS"
EMBEDDING_OUTPUT = "EMBEDDING"


@dataclass(frozen=True, slots=True)
class OipModel:
    """An OIP model name resolved to a served model (its description and labels) and the kind of input it takes."""

    name: str
    info: ModelInfo
    labels: list[str]
    takes_pixels: bool

    @property
    def input_name(self) -> str:
        return PIXELS_INPUT if self.takes_pixels else IMAGE_INPUT

    @property
    def input_datatype(self) -> str:
        return "FP32" if self.takes_pixels else "BYTES"

    @property
    def input_dims(self) -> list[int]:
        """The shape of one batch element."""
        return list(self.info.input_size) if self.takes_pixels else [1]

    @property
    def outputs(self) -> dict[str, int]:
        """Each output's name and the length of one batch element's FP32 row."""
        outputs = {LOGITS_OUTPUT: self.info.num_classes}
        if self.info.embedding_dim:
            outputs[EMBEDDING_OUTPUT] = self.info.embedding_dim
        return outputs

    def metadata(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "versions": [VERSION],
            "platform": "pytorch_torchvision",
            "inputs": [{"name": self.input_name, "datatype": self.input_datatype, "shape": [-1, *self.input_dims]}],
            "outputs": [{"name": name, "datatype": "FP32", "shape": [-1, size]} for name, size in self.outputs.items()],
        }

    def config(self, max_request_batch: int) -> dict[str, Any]:
        """Triton's model configuration, the parts clients and perf_analyzer read."""
        batching = self.info.batching
        return {
            "name": self.name,
            "platform": "pytorch_torchvision",
            "backend": "vit-serve",
            "version_policy": {"latest": {"num_versions": 1}},
            "max_batch_size": max_request_batch,
            "input": [
                {
                    "name": self.input_name,
                    "data_type": "TYPE_FP32" if self.takes_pixels else "TYPE_STRING",
                    "format": "FORMAT_NCHW" if self.takes_pixels else "FORMAT_NONE",
                    "dims": self.input_dims,
                }
            ],
            "output": [{"name": name, "data_type": "TYPE_FP32", "dims": [size]} for name, size in self.outputs.items()],
            "dynamic_batching": {
                "preferred_batch_size": [batching.max_batch_size],
                "max_queue_delay_microseconds": int(batching.max_queue_delay_ms * 1000),
            },
            "instance_group": [{"count": 1, "kind": "KIND_GPU" if self.info.on_gpu else "KIND_CPU"}],
        }


def resolve(engine: Engine, name: str, version: str | None = None) -> OipModel:
    """`m` or `m_pixels` -> the served model; a version other than "1" is not found."""
    if version is not None and version != VERSION:
        raise ModelNotFound(f"model {name!r} has no version {version!r}; its only version is {VERSION!r}")
    served = engine.names()
    base = name.removesuffix(PIXELS_SUFFIX)
    if name in served:
        return OipModel(name, engine.describe(name), engine.labels(name), takes_pixels=False)
    if base != name and base in served:
        return OipModel(name, engine.describe(base), engine.labels(base), takes_pixels=True)
    raise ModelNotFound(f"no model named {name!r}; served: {', '.join(names(engine))}")


def names(engine: Engine) -> list[str]:
    return [n for m in engine.names() for n in (m, m + PIXELS_SUFFIX)]
