"""The one typed settings object: every option is a command-line flag and a `VIT_<NAME>` environment variable."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PositiveFloat,
    PositiveInt,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

Dtype = Literal["auto", "fp32", "fp16", "bf16"]
DecodeDevice = Literal["auto", "cpu", "cuda"]
DecodeBackendSetting = Literal["auto", "torchvision", "nvimagecodec"]
BackendName = Literal["torch", "onnxruntime", "openvino"]
Precision = Literal["float", "int8"]


MaxBatchSize = Annotated[PositiveInt, Field(description="Largest batch sent to the model.")]
MaxQueueDelayMs = Annotated[
    float,
    Field(ge=0, description="The most a batch waits, after its first image, for admitted images still being decoded."),
]
MaxQueueSize = Annotated[
    PositiveInt, Field(description="Images admitted but not yet computed (being decoded or waiting); past it: 503.")
]
MaxQueueBytes = Annotated[
    PositiveInt,
    Field(
        description="Encoded image bytes admitted and still being decoded; past it: 503 at once (a request alone is "
        "always admitted). Sheds a backlog of large images that would otherwise time out."
    ),
]


def _split_names(value: Any) -> Any:
    """Accept `a,b`, `["a", "b"]`, and repeated flags, each possibly comma-separated."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list | tuple):
        names = [part.strip() for item in value for part in str(item).split(",")]
        return [name for name in names if name]
    return value


def _sorted_sizes(value: list[int]) -> list[int]:
    if any(size < 1 for size in value):
        raise ValueError("batch sizes must be positive")
    return sorted(set(value))


def _at_least_one(value: list[str]) -> list[str]:
    if not value:
        raise ValueError("name at least one model")
    return value


ModelNames = Annotated[list[str], NoDecode, BeforeValidator(_split_names), AfterValidator(_at_least_one)]
BatchBuckets = Annotated[list[int], NoDecode, BeforeValidator(_split_names), AfterValidator(_sorted_sizes)]
ModelRepository = Annotated[Path, Field(description="Folder with one sub-folder per model.")]
WeightsCacheDir = Annotated[
    Path | None, Field(description="Where pretrained weights are downloaded to (default: torch hub's cache).")
]
DEFAULT_MODEL = "vit_b_16"
GPU_MAX_BATCH_SIZE = 32
CPU_MAX_BATCH_SIZE = 8  # ViT-B/16 on 2 cores: ~2 images/s at batch 4 and at batch 32 alike


class BatchingConfig(BaseModel):
    """Dynamic batching knobs: global settings, which a model's `[batching]` table overrides for that model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_batch_size: MaxBatchSize = 32
    max_queue_delay_ms: MaxQueueDelayMs = 5.0
    max_queue_size: MaxQueueSize = 256
    max_queue_bytes: MaxQueueBytes = 64 * 2**20


@dataclass(frozen=True, slots=True)
class AccelerationConfig:
    """How a model's batches run on its device (the settings of the same names)."""

    compile: bool
    cuda_graphs: bool
    batch_buckets: list[int]
    decode_device: DecodeDevice
    decode_backend: DecodeBackendSetting
    jpeg_draft: bool
    batch_memory_fraction: float
    pipeline_depth: int
    backend: BackendName = "torch"
    precision: Precision = "float"


class Settings(BaseSettings):
    """Everything the service reads from its environment, read once in the entry point and passed down."""

    model_config = SettingsConfigDict(env_prefix="VIT_", extra="ignore")

    max_batch_size: PositiveInt | None = Field(
        None,
        description="Largest batch sent to the model (default: 32 on a GPU; 8 on the CPU, where a larger batch is no "
        "faster an image and only makes each request wait longer).",
    )
    max_queue_delay_ms: MaxQueueDelayMs = 5.0
    max_queue_size: MaxQueueSize = 256
    max_queue_bytes: MaxQueueBytes = 64 * 2**20
    host: str = Field("0.0.0.0", description="Address to bind.")
    port: int = Field(8000, ge=0, le=65535, description="Port to bind.")
    grpc_port: int = Field(
        8001,
        ge=0,
        le=65535,
        description="Port of the Open Inference Protocol's gRPC service (inference.GRPCInferenceService, with "
        "grpc.health.v1 and reflection), on the same models and batchers as HTTP; 0 turns it off.",
    )
    model_repository: ModelRepository = Path("models")
    model: ModelNames = Field(
        default_factory=lambda: [DEFAULT_MODEL],
        description="Models to serve (repeatable or comma-separated); the first is the default model.",
    )
    weights: str | None = Field(
        None,
        description="Override the default model's weights: a torchvision weights name, a file, or 'random'.",
    )
    weights_cache_dir: WeightsCacheDir = None
    device: str = Field("auto", description="auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
    dtype: Dtype = Field("auto", description="auto (fp16 on CUDA, fp32 on CPU), fp32, fp16 or bf16.")
    backend: BackendName = Field(
        "torch",
        description="What runs the models' forward (a model's model.toml may set its own): torch, onnxruntime (the "
        "model exported to ONNX once and cached; pip install 'vit-serve[onnx]') or openvino (the same export, compiled "
        "by OpenVINO for the CPU; pip install 'vit-serve[openvino]'). Every backend but torch fp32 is checked against "
        "torch fp32 by the accuracy gate at start.",
    )
    precision: Precision = Field(
        "float",
        description="float (the dtype setting's) or int8: post-training static quantisation of the ONNX export, "
        "calibrated on the images in the model folder's calibration/ (backend onnxruntime or openvino).",
    )
    compile: bool = Field(
        False, description="torch.compile the model; the warm-up compiles every batch-size bucket before ready."
    )
    cuda_graphs: bool = Field(
        True,
        description="On CUDA, capture the forward as one CUDA graph per batch-size bucket (a batch is padded up to "
        "its bucket), in the warm-up before ready; no effect on the CPU.",
    )
    batch_buckets: BatchBuckets = Field(
        default_factory=list,
        description="Batch sizes a batch is padded up to with cuda_graphs or compile, comma-separated "
        "(default: powers of two up to max_batch_size, and max_batch_size).",
    )
    decode_device: DecodeDevice = Field(
        "auto",
        description="Where JPEGs are decoded and preprocessed: cpu (PIL, in the decode threads), cuda (nvJPEG and "
        "resize on the model's GPU, a batch at a time; other formats, rotated or unusual JPEGs stay on the CPU), or "
        "auto (cuda when the models are on a GPU).",
    )
    decode_backend: DecodeBackendSetting = Field(
        "auto",
        description="Which library decodes the JPEGs sent to the GPU (decode_device cuda): torchvision (nvJPEG's "
        "CUDA decode, on the GPU's SMs), nvimagecodec (nvImageCodec: the hardware JPEG decoder of an A100, H100 or "
        "H200, else its batched CUDA decode; pip install 'vit-serve[nvimagecodec]'), or auto (nvimagecodec when it is "
        "installed and JPEGs are decoded on the GPU, else torchvision).",
    )
    jpeg_draft: bool = Field(
        False,
        description="Decode large JPEGs on the CPU at 1/2, 1/4 or 1/8 scale in the DCT domain, never below the "
        "model's resize size: several times faster on photos, logits slightly different (see the README).",
    )
    batch_memory_fraction: float = Field(
        0.5,
        gt=0,
        le=1,
        description="On CUDA, the most of the device's memory one forward may allocate, split evenly among the "
        "workers; a larger batch runs in chunks (the cost per image is measured in the warm-up).",
    )
    pipeline_depth: int = Field(
        0, ge=0, description="Batches in flight per model (0: 2 on CUDA, so one copies while one computes; 1 on CPU)."
    )
    request_timeout_s: PositiveFloat | None = Field(
        None,
        description="A request past this answers 504 (default: 30 s, or, on a device the warm-up measured slower, "
        "the time of 4 of the model's largest batches, so that a request of a few images is not cut short on a CPU).",
    )
    max_body_bytes: PositiveInt = Field(64 * 1024 * 1024, description="Largest request body, in bytes.")
    max_images_per_request: PositiveInt = Field(64, description="Most images in one request.")
    max_image_pixels: PositiveInt = Field(
        40_000_000,
        description="Largest image (width x height), as sent and as resized to the model's short side, checked from "
        "the header before decoding.",
    )
    max_image_aspect_ratio: float = Field(
        64.0,
        ge=1,
        description="Most elongated image, long side over short side; the center crop of a longer one sees a "
        "sliver of it.",
    )
    max_jpeg_scans: PositiveInt = Field(
        100,
        description="Most scans in a JPEG, counted from its header (each scan of a progressive JPEG is a pass over "
        "the whole picture; encoders write 1 to about 10).",
    )
    max_jpeg_segments: PositiveInt = Field(
        256,
        description="Most marker segments (metadata, tables) in a JPEG before its picture ends, scans not counted.",
    )
    max_image_chunks: PositiveInt = Field(
        10_000,
        description="Most chunks in a PNG (encoders split the pixel data into chunks of 8 KiB and more: 8,192 of "
        "them fill the default max_body_bytes), or blocks before a GIF's first frame.",
    )
    max_image_metadata_bytes: PositiveInt = Field(
        16 * 1024 * 1024,
        description="Most metadata in one image, in bytes: a JPEG's APPn and COM segments (Exif, XMP, ICC), a PNG's "
        "text, ICC and Exif chunks.",
    )
    workers: PositiveInt = Field(
        1,
        description="Server processes on the one port, each with its own copy of the models, batchers and event loop "
        "(a supervisor restarts one that dies; metrics are summed over them). More than 1 when one process's HTTP "
        "handling is the limit: large images on a GPU, or many small requests.",
    )
    decode_workers: int = Field(
        0, ge=0, description="Threads that decode and preprocess images, per worker (0: the CPU cores / workers)."
    )
    torch_threads: int = Field(
        0, ge=0, description="torch intra-op threads, per worker (0: torch's default; with workers > 1, cores/workers)."
    )
    drain_timeout_s: PositiveFloat = Field(
        30.0, description="On SIGTERM, how long the whole drain may take; past it the process exits at once (status 1)."
    )
    header_timeout_s: PositiveFloat = Field(
        60.0,
        description="A request's line and headers must arrive within this, from the connection's start (or a "
        "kept-alive request's first byte); else 408 and the connection is closed (nginx's client_header_timeout).",
    )
    body_timeout_s: PositiveFloat = Field(
        60.0,
        description="The longest pause between two reads of a request body; past it 408 and the connection is closed "
        "(nginx's client_body_timeout).",
    )
    keep_alive_timeout_s: PositiveFloat = Field(
        5.0,
        description="An idle kept-alive connection is closed after this (behind a load balancer, make it longer than "
        "the balancer's own idle timeout).",
    )
    max_header_bytes: PositiveInt = Field(
        32 * 1024,
        description="Largest request line and headers together, in bytes; past it 431 (nginx's "
        "large_client_header_buffers 4 8k).",
    )
    max_header_count: PositiveInt = Field(100, description="Most request headers; past it 431.")
    max_connections: PositiveInt = Field(
        1024,
        description="Open connections per worker past which a request is answered 503 too_many_connections at once "
        "(the probes and /metrics are always served).",
    )
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log level.")
    log_format: Literal["json", "text"] = Field("json", description="Logs as one JSON object a line, or plain text.")
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list,
        description="API keys, comma-separated; when any is set, every endpoint but the probes, the docs and the demo "
        "page needs Authorization: Bearer <key>.",
    )
    api_keys_file: Path | None = Field(
        None, description="A file of API keys, one a line (e.g. a mounted Kubernetes secret); adds to api_keys."
    )
    model_control: bool = Field(
        False,
        description="Allow loading, reloading and unloading the repository's models while serving "
        "(POST /v1/models/{name}/load and /unload, OIP's repository extension); needs api_keys, and workers = 1.",
    )
    tracing: Literal["auto", "on", "off"] = Field(
        "auto",
        description="OpenTelemetry traces of every request, exported over OTLP as the standard OTEL_* variables say "
        "(needs the otel extra): auto turns them on when OTEL_EXPORTER_OTLP_ENDPOINT, "
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or OTEL_TRACES_EXPORTER is set (and OTEL_SDK_DISABLED is not true).",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Origins allowed to call the API from a browser, comma-separated, or * for any (default: none).",
    )

    @field_validator("api_keys", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys")
    @classmethod
    def _usable_keys(cls, value: list[SecretStr]) -> list[SecretStr]:
        for key in value:
            secret = key.get_secret_value()
            if not secret or any(c.isspace() or c == "," for c in secret) or not secret.isprintable():
                raise ValueError("an API key must be printable, with no spaces or commas")
        return value

    @model_validator(mode="after")
    def _read_api_keys_file(self) -> Settings:
        if self.api_keys_file is not None:
            try:
                lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ValueError(f"cannot read api_keys_file {str(self.api_keys_file)!r}: {exc.strerror}") from None
            keys = [SecretStr(line.strip()) for line in lines if line.strip() and not line.lstrip().startswith("#")]
            self.api_keys = [*self.api_keys, *self._usable_keys(keys)]
        return self

    @model_validator(mode="after")
    def _guarded_model_control(self) -> Settings:
        if self.model_control and not self.api_keys:
            raise ValueError("model_control needs api_keys: loading and unloading models must not be open to anyone")
        if self.model_control and self.workers > 1:
            raise ValueError(
                "model_control needs workers = 1: a load or unload would reach only the worker that took the call"
            )
        return self

    def batching(self, *, on_cpu: bool = False) -> BatchingConfig:
        """The batching knobs as set, `max_batch_size` unset taking the device's default."""
        config = self.model_dump(include=set(BatchingConfig.model_fields), exclude_none=True)
        config.setdefault("max_batch_size", CPU_MAX_BATCH_SIZE if on_cpu else GPU_MAX_BATCH_SIZE)
        return BatchingConfig.model_validate(config)

    def acceleration(self) -> AccelerationConfig:
        """As set, but `batch_memory_fraction` is this worker's share: the workers split the device between them."""
        config = AccelerationConfig(**self.model_dump(include={f.name for f in dataclasses.fields(AccelerationConfig)}))
        return dataclasses.replace(config, batch_memory_fraction=self.batch_memory_fraction / self.workers)

    @property
    def default_model(self) -> str:
        return self.model[0]

    def resolved_decode_workers(self) -> int:
        return self.decode_workers or self._cores_per_worker()

    def resolved_torch_threads(self) -> int | None:
        """Threads to give torch, or None for torch's own default (one process, nothing set)."""
        if self.torch_threads:
            return self.torch_threads
        return self._cores_per_worker() if self.workers > 1 else None

    def _cores_per_worker(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.workers)
