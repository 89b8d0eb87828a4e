"""One served model: its module, labels and preprocessing, the batcher in front of its forward pass (classify and
embed), its warm-up and description; its explanations are an `Explainer` of their own."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import io
import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image
from torch import nn

from app.config.model_config import AccuracyGate
from app.config.settings import AccelerationConfig, BatchingConfig
from app.engine.accuracy_gate import compare, enforce, gate_images, image_files
from app.engine.batcher import Batcher
from app.engine.descriptions import Agreement, BatchRecord, Measured, ModelInfo, ModelStatus
from app.engine.explainer import Explainer
from app.errors import ModelLoadError, ServeError
from app.pipeline.decode import decode
from app.pipeline.gpu_decode import probe_jpeg
from app.pipeline.image_scan import NO_LIMITS, ImageLimits, check_size, check_structure
from app.pipeline.jpeg_decoders import decode_backend
from app.pipeline.postprocess import ImageOutput
from app.pipeline.preprocess import preprocess
from app.runtime.backends.base import ForwardPlan
from app.runtime.backends.onnx_export import MAX_CALIBRATION_IMAGES
from app.runtime.backends.registry import backend_for
from app.runtime.device import dtype_name
from app.runtime.lanes import Lane, LaneSpec, Prepared
from app.runtime.memory import forward_bytes_per_image, images_per_forward
from app.runtime.runner import batch_buckets
from app.sources.base import LoadedModel

log = logging.getLogger(__name__)


class ModelEvents(Protocol):
    """Where a served model reports its batches (the engine passes them on to its observers)."""

    def batch_done(self, model: str, record: BatchRecord) -> None: ...

    def batch_split(self, model: str, size: int) -> None: ...

    def accuracy_measured(self, model: str, agreement: Agreement) -> None: ...


class WarmUpStopped(Exception):
    """The model was stopped while it warmed up: the steps left were skipped."""


class ServedModel:
    """Decode and preprocess run on the caller's threads (`prepare`); batches run on the batcher's threads, each in a
    lane of its own (`pipeline_depth` of them)."""

    def __init__(
        self,
        name: str,
        arch: str,
        loaded: LoadedModel,
        *,
        device: torch.device,
        dtype: torch.dtype,
        batching: BatchingConfig,
        acceleration: AccelerationConfig,
        gate: AccuracyGate | None = None,
        calibration: Path | None = None,
        export_dir: Path | None = None,
        fingerprint: str = "",
    ) -> None:
        """`dtype` is the compute precision asked for; the module is loaded in `backend.module_dtype(dtype)` (fp32
        for a backend that exports it). `calibration`: the folder of int8's and the accuracy gate's images."""
        self.name = name
        self.arch = arch
        self.labels = loaded.labels
        self._loaded = loaded
        split = loaded.embedding
        self.embedding_dim = split.dim if split is not None else 0  # 0: served without embeddings
        self._module: nn.Module = split if split is not None else loaded.module  # logits, then the embedding
        self._preprocessor = loaded.preprocessing.transform
        self._device = device
        self._dtype = dtype
        self.acceleration = acceleration
        self.backend = backend_for(acceleration.backend)
        self._module_dtype = self.backend.module_dtype(dtype)  # what the torch module computes in
        self.gate = gate or AccuracyGate()
        self.calibration = calibration
        self._export_dir = export_dir
        self._fingerprint = fingerprint or f"{arch}|{len(self.labels)}|{self.embedding_dim}"
        self.agreement: Agreement | None = None  # measured in the warm-up, on a fast path
        self.decode_on_device = (
            acceleration.decode_device in ("auto", "cuda")
            and device.type == "cuda"
            and loaded.preprocessing.takes_tensors
        )
        # chosen once: a missing nvImageCodec asked for by name is a start-up error
        self.decode_backend = decode_backend(acceleration.decode_backend, on_device=self.decode_on_device)
        self.pipeline_depth = acceleration.pipeline_depth or (2 if device.type == "cuda" else 1)
        self.max_images_per_forward = batching.max_batch_size  # bounded by device memory in the warm-up
        resize_side = loaded.preprocessing.resize_side
        # JPEGs decoded at a reduced scale, no smaller than the preprocessing's resize (where its source allows it)
        draft = acceleration.jpeg_draft and loaded.preprocessing.jpeg_draft
        self.draft_size: int | None = resize_side if draft else None
        # the side an image's short side is resized to; for a fixed-size resize, torchvision's ratio (256 for 224),
        # which bounds the resize from above
        self.resize_side = resize_side or math.ceil(loaded.image_size * 256 / 224)
        self.buckets: list[int] = []  # batch sizes compiled or captured, in the warm-up
        self.measured: Measured | None = None  # timed at the end of the warm-up
        self._stopped = threading.Event()
        self._lanes: queue.SimpleQueue[Lane] = queue.SimpleQueue()
        self.events: ModelEvents | None = None  # the engine's: whoever observes it hears of batches
        self.batcher: Batcher[Prepared, ImageOutput] = Batcher(
            self.forward, batching, name=name, on_batch=self._batch_done, max_in_flight=self.pipeline_depth
        )
        # None when this model's attention cannot be read
        self.explainer = (
            Explainer(
                name, loaded.attention, loaded.preprocessing, device=device, dtype=self._module_dtype, batching=batching
            )
            if loaded.attention is not None
            else None
        )

    def _batch_done(self, record: BatchRecord) -> None:
        if self.events is not None:
            self.events.batch_done(self.name, record)

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def fast_path(self) -> str | None:
        """What this model runs that is not the exact path (torch fp32, JPEGs decoded on the CPU at full scale), as
        one name (`openvino+int8`, `fp16+compile+gpu_decode`), or None: the accuracy gate has nothing to check."""
        parts = [] if self.backend.name == "torch" else [self.backend.name]
        if self.acceleration.precision == "int8":
            parts.append("int8")
        if self._dtype != torch.float32:
            parts.append(dtype_name(self._dtype))
        if self.acceleration.compile and self.backend.name == "torch":
            parts.append("compile")
        if self.draft_size is not None:
            parts.append("jpeg_draft")
        if self.decode_on_device:
            parts.append(f"gpu_decode({self.decode_backend.name})")
        return "+".join(parts) or None

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

    def prepare(self, data: bytes, limits: ImageLimits) -> Prepared:
        """Decode and preprocess one image: bytes -> (3, crop, crop) float32. Runs in the decode pool.

        With `decode_device = cuda`, a JPEG the device can decode is only checked here (`limits`, from its header)
        and left for its batch.
        """
        if self.decode_on_device:
            check_structure(data, limits)
            jpeg = probe_jpeg(data, max_pixels=limits.max_pixels)
            if jpeg is not None:
                check_size(jpeg.width, jpeg.height, limits, resize_side=self.resize_side)
                return jpeg
        image = decode(data, limits=limits, resize_side=self.resize_side, draft_size=self.draft_size)
        return preprocess(image, self._preprocessor)

    def prepare_on_cpu(self, data: bytes, limits: ImageLimits) -> torch.Tensor:
        """Decode and preprocess one image on the CPU, exactly (the explain path): bytes -> (3, crop, crop) float32."""
        return preprocess(decode(data, limits=limits, resize_side=self.resize_side), self._preprocessor)

    def forward(self, images: list[Prepared]) -> list[ImageOutput | ServeError]:
        """Run one batch in a free lane: n prepared images -> n outputs. Runs on one of the batcher's threads."""
        lane = self._lanes.get(timeout=60)  # never waits: the batcher runs at most as many batches as there are lanes
        try:
            return self._run(lane, images)
        finally:
            self._lanes.put(lane)

    def _run(self, lane: Lane, images: list[Prepared]) -> list[ImageOutput | ServeError]:
        """Out of device memory, the batch is retried in two halves (and so on down to one image) before it fails:
        a batch that fits at 16 but not at 32 is still answered, slower, instead of failing 32 requests."""
        try:
            return lane.run(images)
        except torch.OutOfMemoryError:
            if len(images) == 1:
                raise
            if self.events is not None:
                self.events.batch_split(self.name, len(images))
            log.warning(
                "model %r: out of memory on a batch of %d; retrying it in two halves",
                self.name,
                len(images),
                extra={"fields": {"model": self.name, "batch_size": len(images)}},
            )
            if self.on_gpu:
                torch.cuda.empty_cache()
            half = len(images) // 2
            return self._run(lane, images[:half]) + self._run(lane, images[half:])

    def warm_up(self, *, gate: bool = True) -> None:
        """Build the lanes and run every batch size each will see (compiling and capturing), before ready; then time
        one image and the largest batch (`measured`); then, on a fast path, the accuracy gate (unless `gate` is
        False: `vit-serve verify` runs it on its own images). Each step is logged as it starts and ends.

        On the CPU a lane needs one image through it, not a full batch (seconds of a ViT-B on two cores). On CUDA, first
        measure one image's forward memory and bound the images per forward by
        `batch_memory_fraction` of the device's memory.
        """
        acceleration = self.acceleration
        max_batch_size = self.batcher.config.max_batch_size
        example = torch.randn((max_batch_size, *self.input_shape), generator=torch.Generator().manual_seed(0))
        if self.on_gpu:
            with torch.inference_mode():
                measured = example[: min(max_batch_size, 8)].to(self._device, self._dtype)
                per_image = forward_bytes_per_image(self._module, measured)
            device_bytes = torch.cuda.get_device_properties(self._device).total_memory
            self.max_images_per_forward = images_per_forward(
                per_image, device_bytes, acceleration.batch_memory_fraction, max_batch_size
            )
            log.info(
                "model %r: a forward takes %.1f MiB an image; at most %d images a forward",
                self.name,
                per_image / 2**20,
                self.max_images_per_forward,
                extra={"fields": {"model": self.name, "bytes_per_image": per_image}},
            )
        self.buckets = batch_buckets(self.max_images_per_forward, acceleration.batch_buckets)
        plan = ForwardPlan(
            name=self.name,
            module=self._module,
            device=self._device,
            dtype=self._dtype,
            precision=acceleration.precision,
            input_shape=self.input_shape,
            buckets=self.buckets,
            compile=acceleration.compile,
            cuda_graphs=acceleration.cuda_graphs,
            export_dir=self._export_dir,
            fingerprint=self._fingerprint,
            calibration=self._calibration_images,
            threads=torch.get_num_threads(),
        )
        with self._step(f"backend {self.backend.name}"):
            new_forward = self.backend.prepare(plan)
        spec = LaneSpec(
            device=self._device,
            dtype=self._module_dtype,
            input_shape=self.input_shape,
            max_batch_size=max_batch_size,
            num_classes=self.num_classes,
            embedding_dim=self.embedding_dim,
            max_images_per_forward=self.max_images_per_forward,
            preprocessor=self._preprocessor,
            decode_on_cpu=self._decode_on_cpu,
            decode_backend=self.decode_backend,
        )
        first: Lane | None = None
        for number in range(1, self.pipeline_depth + 1):
            forward = new_forward()
            lane = Lane(spec, forward)
            with self._step(f"lane {number} of {self.pipeline_depth} ({type(forward).__name__})"):
                lane.warm_up(example)
                if self.decode_on_device:  # the device decoder's first use initialises it: not while serving
                    jpeg = probe_jpeg(_warmup_jpeg(), max_pixels=sys.maxsize)
                    assert jpeg is not None
                    lane.run([jpeg, jpeg])
            if number == 1:
                self.measured = self._measure(lane, example)
                first = lane
            self._lanes.put(lane)
        path = self.fast_path
        if gate and path is not None and first is not None:
            images, source = gate_images(self.calibration, self.gate.images)
            with self._step(f"accuracy gate: {path} against torch fp32 on {len(images)} {source}"):
                self.agreement = self.compare(images, source, lane=first)
            log.info(
                "model %r: accuracy gate: %s: top-1 agreement %.4g, top-5 overlap %.4g, relative logit error max "
                "%.3g mean %.3g on %d %s",
                self.name,
                path,
                self.agreement.top1_agreement,
                self.agreement.top5_overlap,
                self.agreement.max_relative_error,
                self.agreement.mean_relative_error,
                self.agreement.images,
                source,
                extra={"fields": {"model": self.name, "accuracy_gate": self.agreement.as_json()}},
            )
            if self.events is not None:
                self.events.accuracy_measured(self.name, self.agreement)
            enforce(self.name, self.agreement, self.gate)

    def compare(self, images: list[bytes], source: str, *, lane: Lane | None = None) -> Agreement:
        """This model's served path against the exact path (CPU decode at full scale, the torch module in fp32) on
        `images`: the accuracy gate's figures, judged by the model's bounds. Blocking; for the warm-up and `verify`."""
        if lane is None:
            lane = self._lanes.get(timeout=60)
            try:
                return self.compare(images, source, lane=lane)
            finally:
                self._lanes.put(lane)
        chunk = self.batcher.config.max_batch_size
        exact_module = self._module
        if self._module_dtype != torch.float32:
            exact_module = copy.deepcopy(self._module).to(torch.float32)
        exact_rows: list[torch.Tensor] = []
        fast_rows: list[torch.Tensor] = []
        classes = self.num_classes
        with torch.inference_mode():
            for start in range(0, len(images), chunk):
                part = images[start : start + chunk]
                pixels = torch.stack([self.prepare_on_cpu(data, NO_LIMITS) for data in part]).to(self._device)
                exact_rows.append(exact_module(pixels)[:, :classes].float().cpu())
                outputs = lane.run([self.prepare(data, NO_LIMITS) for data in part])
                for output in outputs:
                    if isinstance(output, ServeError):
                        raise output
                fast_rows.append(torch.stack([output.logits for output in outputs if isinstance(output, ImageOutput)]))
        return compare(self.fast_path or "exact", source, torch.cat(exact_rows), torch.cat(fast_rows), self.gate)

    def _calibration_images(self) -> list[torch.Tensor]:
        """The model folder's calibration images, preprocessed exactly (int8's calibration reads them)."""
        files = image_files(self.calibration) if self.calibration is not None else []
        if not files:
            raise ModelLoadError(
                f"model {self.name!r}: precision int8 needs calibration images in {self.calibration}: a few hundred "
                "of the images the model will serve (JPEG, PNG, ...)"
            )
        return [self.prepare_on_cpu(file.read_bytes(), NO_LIMITS) for file in files[:MAX_CALIBRATION_IMAGES]]

    def _measure(self, lane: Lane, example: torch.Tensor) -> Measured:
        """One image alone, then the largest batch, through a warm lane: the latency and throughput served."""
        with self._step("timing a batch of 1") as one:
            lane.run(list(example[:1]))
        with self._step(f"timing a batch of {len(example)}") as full:
            lane.run(list(example))
        return Measured(
            batch_size=len(example),
            images_per_s=round(len(example) / full.seconds, 2),
            latency_ms_batch1=round(one.seconds * 1000, 3),
        )

    @contextlib.contextmanager
    def _step(self, what: str) -> Iterator[_Stopwatch]:
        """Log a warm-up step as it starts and when it is done, with its time: a long warm-up shows progress. A model
        stopped meanwhile (SIGTERM while warming up) starts no further step: its process need not wait for them."""
        if self._stopped.is_set():
            raise WarmUpStopped(f"model {self.name!r} was stopped during its warm-up")
        log.info("warming up %r: %s ...", self.name, what)
        watch = _Stopwatch(time.perf_counter())
        yield watch
        watch.seconds = time.perf_counter() - watch.started
        log.info(
            "warming up %r: %s: %.2f s",
            self.name,
            what,
            watch.seconds,
            extra={"fields": {"model": self.name, "warmup_step": what, "seconds": round(watch.seconds, 3)}},
        )

    def _decode_on_cpu(self, data: bytes) -> torch.Tensor:
        return self.prepare_on_cpu(data, NO_LIMITS)  # a JPEG `prepare` checked, which the device could not decode

    def acceleration_info(self) -> dict[str, Any]:
        """How batches run: what was asked for and what the warm-up settled (buckets, images per forward)."""
        return {
            "compile": self.acceleration.compile,
            "cuda_graphs": self.acceleration.cuda_graphs and self.on_gpu,
            "batch_buckets": self.buckets,
            "decode_device": "cuda" if self.decode_on_device else "cpu",
            "decode_backend": self.decode_backend.name if self.decode_on_device else None,
            "jpeg_draft": self.draft_size is not None,
            "pipeline_depth": self.pipeline_depth,
            "max_images_per_forward": self.max_images_per_forward,
            "backend": self.backend.name,
            "precision": self.acceleration.precision,
            "explain_backend": "torch" if self.explainer is not None else None,
            "fast_path": self.fast_path,
        }

    async def start(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.warm_up)
        await self.batcher.start()
        if self.explainer is not None:
            await self.explainer.batcher.start()

    async def stop(self, timeout_s: float) -> None:
        self._stopped.set()  # a warm-up still running skips its remaining steps
        explainer = self.explainer.batcher.stop(timeout_s) if self.explainer is not None else asyncio.sleep(0)
        await asyncio.gather(self.batcher.stop(timeout_s), explainer)

    def status(self) -> ModelStatus:
        return ModelStatus(ready=self.ready, queue_depth=self.batcher.depth)

    def info(self) -> ModelInfo:
        size = self._loaded.image_size
        return ModelInfo(
            name=self.name,
            arch=self.arch,
            weights=self._loaded.weights_source,
            num_params=self._loaded.num_params,
            input_size=[3, size, size],
            num_classes=self.num_classes,
            embedding_dim=self.embedding_dim,
            explain=self.explainer is not None,
            device=str(self._device),
            dtype=dtype_name(self._dtype),
            batching=self.batcher.config,
            preprocess=self._loaded.preprocessing.info,
            acceleration=self.acceleration_info(),
            measured=self.measured,
            accuracy_gate=self.agreement,
            ready=self.ready,
        )


@dataclass(slots=True)
class _Stopwatch:
    started: float
    seconds: float = 0.0


def _warmup_jpeg() -> bytes:
    """A small JPEG to initialise the device decoder with."""
    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((64, 48)).save(buffer, format="JPEG")
    return buffer.getvalue()
