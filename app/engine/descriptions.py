"""What the engine says about a served model: plain, typed descriptions that the HTTP layer and the metrics read (they
never see a `ServedModel` or its batcher). One definition each: the API's `/v1/models` answers and documents these
very types (pydantic reads their field descriptions)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from app.config.settings import BatchingConfig


@dataclass(frozen=True, slots=True)
class Measured:
    """What the warm-up timed on this device, for a client to size its batches and timeouts by."""

    batch_size: Annotated[int, Field(description="The largest batch, timed.")]
    images_per_s: Annotated[float, Field(description="Throughput at that batch size.")]
    latency_ms_batch1: Annotated[float, Field(description="One image alone, through the forward.")]


@dataclass(frozen=True, slots=True)
class Agreement:
    """How closely a fast path's logits follow the exact path's, over the gate's images."""

    path: Annotated[str, Field(description="The fast path measured, e.g. openvino+int8, fp16+compile, jpeg_draft.")]
    images: Annotated[int, Field(description="Images compared.")]
    source: Annotated[str, Field(description="Where they came from: calibration images, built-in photographs, ...")]
    top1_agreement: Annotated[float, Field(description="Share of images whose top-1 class is the same.")]
    top5_overlap: Annotated[float, Field(description="Mean share of the exact top-5 classes in the fast top-5.")]
    max_relative_error: Annotated[
        float, Field(description="Largest logit error over the images, each relative to its exact largest |logit|.")
    ]
    mean_relative_error: Annotated[float, Field(description="The same, averaged over the images.")]
    passed: Annotated[bool, Field(description="Whether every bound of the model's [accuracy_gate] is met.")] = True

    def as_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def measures(self) -> dict[str, float]:
        """The four figures by name (the metrics' `measure` label)."""
        return {
            "top1_agreement": self.top1_agreement,
            "top5_overlap": self.top5_overlap,
            "max_relative_error": self.max_relative_error,
            "mean_relative_error": self.mean_relative_error,
        }


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A served model: what it is, how it runs, and whether it is ready."""

    name: str
    arch: str
    weights: str
    num_params: int
    input_size: Annotated[list[int], Field(description="One preprocessed image: [3, height, width].")]
    num_classes: int
    embedding_dim: Annotated[int, Field(description="Floats per embedding from /embed (0: served without embeddings).")]
    explain: Annotated[bool, Field(description="Whether /explain is served (the model's attention can be read).")]
    device: str
    dtype: str
    batching: BatchingConfig
    preprocess: dict[str, Any]
    acceleration: Annotated[
        dict[str, Any],
        Field(
            description="How batches run: compile, cuda_graphs, batch_buckets, decode_device, decode_backend (the "
            "library decoding JPEGs on the GPU; null when they are decoded on the CPU), pipeline_depth, "
            "max_images_per_forward, backend (torch, onnxruntime, openvino), precision (float, int8), explain_backend "
            "(explanations always run on torch), fast_path (what differs from torch fp32 on exact CPU decode; null: "
            "none)."
        ),
    ]
    measured: Annotated[
        Measured | None,
        Field(
            description="What the warm-up timed on this device (null while warming up): a client sizes its batches "
            "and timeouts by it."
        ),
    ]
    accuracy_gate: Annotated[
        Agreement | None,
        Field(
            description="How the model's fast path (acceleration.fast_path) agreed with torch fp32 on the accuracy "
            "gate's images at start; null on the exact path (nothing to check) and while warming up."
        ),
    ]
    ready: bool
    request_timeout_s: Annotated[
        float | None, Field(description="The deadline of a request to this model, in seconds: past it, 504.")
    ] = None

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    def as_json(self) -> dict[str, Any]:
        fields = dataclasses.asdict(self)
        fields["batching"] = self.batching.model_dump()
        return fields


@dataclass(frozen=True, slots=True)
class ModelStatus:
    """A served model's state now, read often (the metrics' gauges): cheap, unlike `ModelInfo`."""

    ready: bool
    queue_depth: int  # images admitted and not yet computed


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """What one batch did (an engine event, for the metrics and the traces)."""

    size: int
    queue_waits_s: list[float]  # each image's, until the batch started
    run_s: float
    failed: bool
    started_ns: int = 0  # wall clock (`time.time_ns`): the batch taken off the queue
    ended_ns: int = 0  # its results (or its error) back
    traces: tuple[object, ...] = ()  # the traced requests it served, each once (`app.engine.tracing`)


@dataclass(frozen=True, slots=True)
class RepositoryEntry:
    """A model of the model repository, or one served: whether it is served, and ready."""

    name: str
    served: bool
    ready: bool
