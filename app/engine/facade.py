"""The inference engine as a library: load models, then `await engine.classify(...)`; no HTTP below this line.

engine = Engine.load(settings)
async with engine:
    predictions = await engine.classify([jpeg_bytes], top_k=5)
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from app.config.model_config import list_models
from app.config.settings import Settings
from app.engine.batcher import Batcher, Completed
from app.engine.decode_pool import DecodePool
from app.engine.descriptions import Agreement, BatchRecord, ModelInfo, ModelStatus, RepositoryEntry
from app.engine.loading import ModelLoader
from app.engine.served_model import ServedModel
from app.engine.tracing import NO_STAGE, NO_TRACER, Stage, Tracer
from app.errors import (
    BadRequest,
    Conflict,
    DeadlineExceeded,
    InvalidParameter,
    ModelLoadError,
    ModelLoadFailed,
    ModelNotFound,
    NotReady,
    PayloadTooLarge,
    ServeError,
)
from app.pipeline import postprocess
from app.pipeline.image_scan import ImageLimits
from app.pipeline.postprocess import ImageOutput, Prediction
from app.runtime.lanes import Prepared
from app.sources.registry import read_config

log = logging.getLogger(__name__)

DEFAULT_TOP_K = 5
In = TypeVar("In")
Out = TypeVar("Out")
T = TypeVar("T")


DEFAULT_REQUEST_TIMEOUT_S = 30.0
TIMEOUT_IN_BATCHES = 4  # unset, a request's deadline covers this many of its model's largest batches, as measured


@dataclass(frozen=True, slots=True)
class Limits:
    max_images_per_request: int
    request_timeout_s: float | None  # None: from the model's measured speed (`Engine.request_timeout_s`)
    image: ImageLimits = field(default_factory=ImageLimits)  # what one image may cost, checked from its header

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        image = ImageLimits(
            max_pixels=settings.max_image_pixels,
            max_aspect_ratio=settings.max_image_aspect_ratio,
            max_jpeg_scans=settings.max_jpeg_scans,
            max_jpeg_segments=settings.max_jpeg_segments,
            max_image_chunks=settings.max_image_chunks,
            max_metadata_bytes=settings.max_image_metadata_bytes,
        )
        return cls(settings.max_images_per_request, settings.request_timeout_s, image)


@dataclass(frozen=True, slots=True)
class Timings:
    """Where one request's time went, in seconds: its images decoded in parallel, then the slowest image's wait
    in the queue and its batch's forward."""

    preprocess_s: float = 0.0
    queue_wait_s: float = 0.0
    inference_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Inference:
    """The model's raw outputs for a request's images, in order."""

    model: str
    outputs: list[ImageOutput]
    timings: Timings


@dataclass(frozen=True, slots=True)
class Classification:
    model: str
    predictions: list[Prediction]
    timings: Timings = field(default_factory=Timings)


@dataclass(frozen=True, slots=True)
class Embeddings:
    model: str
    vectors: np.ndarray  # (n, dim) float32, one row per image in order
    normalized: bool
    timings: Timings


@dataclass(frozen=True, slots=True)
class Explanation:
    prediction: Prediction
    attention: np.ndarray  # (rows, cols) float32: the attention-rollout map over the patch grid, summing to 1
    overlay_png: bytes | None  # the map over the image the model saw, when asked for


@dataclass(frozen=True, slots=True)
class Explanations:
    model: str
    explanations: list[Explanation]
    timings: Timings


class EngineObserver(Protocol):
    """What the engine reports as it works, to whoever `Engine.observe`s it (the metrics do)."""

    def image_prepared(self, model: str, seconds: float) -> None:
        """One image decoded and preprocessed, on a decode thread."""

    def batch_done(self, model: str, record: BatchRecord) -> None:
        """One batch ran (or failed), on the batcher's thread."""

    def batch_split(self, model: str, size: int) -> None:
        """A batch of `size` images ran out of device memory and is retried in two halves."""

    def model_loaded(self, model: ModelInfo) -> None:
        """A model is served from now on (at `observe`, every model served then)."""

    def model_unloaded(self, name: str) -> None:
        """A model is no longer served."""

    def accuracy_measured(self, model: str, agreement: Agreement) -> None:
        """A model's accuracy gate measured its fast path against torch fp32, in its warm-up."""


class _Events:
    """The engine's events, passed on to every observer (and each traced batch to the tracer): the served models
    report here, whoever observes or not."""

    def __init__(self) -> None:
        self.observers: list[EngineObserver] = []
        self.tracer: Tracer = NO_TRACER

    def image_prepared(self, model: str, seconds: float) -> None:
        for observer in self.observers:
            observer.image_prepared(model, seconds)

    def batch_done(self, model: str, record: BatchRecord) -> None:
        for observer in self.observers:
            observer.batch_done(model, record)
        if record.traces:
            self.tracer.batch(model, record)

    def batch_split(self, model: str, size: int) -> None:
        for observer in self.observers:
            observer.batch_split(model, size)

    def accuracy_measured(self, model: str, agreement: Agreement) -> None:
        for observer in self.observers:
            observer.accuracy_measured(model, agreement)

    def model_loaded(self, model: ModelInfo) -> None:
        for observer in self.observers:
            observer.model_loaded(model)

    def model_unloaded(self, name: str) -> None:
        for observer in self.observers:
            observer.model_unloaded(name)


@dataclass(frozen=True, slots=True)
class ModelRepository:
    """Where models loaded while serving come from: the folder of model folders."""

    names: Callable[[], list[str]]  # the models it holds
    load: Callable[[str], ServedModel]  # a name -> that model, loaded (blocking), not yet warm


class Engine:
    """Several served models sharing one decode pool; the first model is the default."""

    def __init__(
        self,
        models: Sequence[ServedModel],
        *,
        limits: Limits,
        decode_workers: int,
        repository: ModelRepository | None = None,
    ) -> None:
        if not models:
            raise ValueError("an engine needs at least one model")
        self._models = {m.name: m for m in models}
        self._events = _Events()
        for model in models:
            model.events = self._events
        self.repository = repository  # for models loaded while serving (`load_model`)
        self._control = asyncio.Lock()  # one load or unload at a time
        self.default_model = models[0].name
        self.limits = limits
        self.decode_pool = DecodePool(decode_workers)
        self._started = False
        self._warming = False
        self.failure: str | None = None  # why the warm-up failed: the service will not become ready
        self._stopping = False

    @classmethod
    def load(cls, settings: Settings) -> Engine:
        """Read every named model's config and load its weights (blocking; raises `ModelLoadError`)."""
        load = ModelLoader(settings)

        for name in settings.model:  # every config read first: a typo in the last fails before any weights load
            read_config(settings.model_repository, name)
        return cls(
            [load(name) for name in settings.model],
            limits=Limits.from_settings(settings),
            decode_workers=settings.resolved_decode_workers(),
            repository=ModelRepository(names=lambda: list_models(settings.model_repository), load=load),
        )

    def observe(self, observer: EngineObserver) -> None:
        """Report to `observer` from now on: first every model served now (`model_loaded`), then each event."""
        self._events.observers.append(observer)
        for name in self._models:
            observer.model_loaded(self.describe(name))

    def trace(self, tracer: Tracer) -> None:
        """Report each request's stages and each batch's requests to `tracer` from now on (`app.engine.tracing`)."""
        self._events.tracer = tracer

    def names(self) -> list[str]:
        """The served models' names, the default first."""
        return list(self._models)

    def describe(self, name: str | None = None) -> ModelInfo:
        """A served model (the default one without a name): what it is, how it runs, its deadline; 404 if unknown."""
        served = self.model(name)
        return dataclasses.replace(served.info(), request_timeout_s=self.request_timeout_s(served))

    def resolve(self, name: str | None = None) -> str:
        """The name of the model a request for `name` goes to (the default one for None); `ModelNotFound` if none."""
        return self.model(name).name

    def status(self, name: str) -> ModelStatus:
        """A served model's readiness and queue depth, now (cheap: the metrics read it at every scrape)."""
        return self.model(name).status()

    def labels(self, name: str) -> list[str]:
        """A served model's class labels, by class index."""
        return self.model(name).labels

    def repository_index(self) -> list[RepositoryEntry]:
        """Every model of the model repository and every one served, by name: served, and ready."""
        if self.repository is None:
            raise NotReady("this engine cannot load models while serving")
        names = sorted(set(self.repository.names()) | set(self._models))
        return [
            RepositoryEntry(name, served=name in self._models, ready=name in self._models and self._models[name].ready)
            for name in names
        ]

    @property
    def ready(self) -> bool:
        return self.not_ready_reason() is None

    def not_ready_reason(self) -> str | None:
        """Why the engine is not ready, in a few words; None when it is."""
        if not self._started:
            return self.failure or ("warming up" if self._warming else "not started")
        if self._stopping:
            return "shutting down"
        down = [name for name, model in self._models.items() if not model.ready]
        if down:
            return f"model {', '.join(map(repr, down))} not ready"
        if self.decode_pool.exhausted:
            return f"all {self.decode_pool.threads} decode threads are held by decodes past their request's deadline"
        return None

    def model(self, name: str | None = None) -> ServedModel:
        """The served model itself, for the engine and its tests; whatever is above the engine reads `describe`,
        `status` and `labels` instead."""
        try:
            return self._models[name or self.default_model]
        except KeyError:
            raise ModelNotFound(f"no model named {name!r}; served: {', '.join(self._models)}") from None

    async def start(self) -> None:
        """Warm every model up (`ServedModel.warm_up`) and start its batcher; ready when it returns. Until then
        readiness says "warming up", and after a failure (which is raised) why it failed."""
        started = time.perf_counter()
        self._warming = True
        try:
            for model in self._models.values():
                await _warm(model)
        except Exception as exc:
            self.failure = f"warm-up failed: {type(exc).__name__}: {exc}"
            raise
        finally:
            self._warming = False
        self._started = True
        seconds = time.perf_counter() - started
        log.info(
            "ready: %s warm in %.1f s",
            ", ".join(map(repr, self._models)),
            seconds,
            extra={"fields": {"models": list(self._models), "warmup_s": round(seconds, 3)}},
        )

    async def load_model(self, name: str, *, drain_timeout_s: float) -> ModelInfo:
        """Load `name` from the model repository while serving, warm it up, and serve it. A model already served
        under that name is replaced: requests it accepted are answered by it (drained for up to `drain_timeout_s`),
        requests from the swap on go to the new one. Raises `ModelNotFound` (no such folder) or `ModelLoadFailed`."""
        if self.repository is None:
            raise NotReady("this engine cannot load models while serving")
        if name not in self.repository.names():
            raise ModelNotFound(f"the model repository has no model {name!r}")
        async with self._control:
            if self._stopping:
                raise NotReady("the service is shutting down")
            try:
                model = await asyncio.get_running_loop().run_in_executor(None, self.repository.load, name)
            except ModelLoadError as exc:
                raise ModelLoadFailed(str(exc)) from None
            except Exception as exc:  # e.g. out of device memory: the load fails, what is served goes on
                log.exception("model %r: loading failed", name)
                raise ModelLoadFailed(f"model {name!r}: {type(exc).__name__}: {exc}") from None
            model.events = self._events
            try:
                await _warm(model)
            except Exception as exc:
                await model.stop(0)
                log.exception("model %r: warm-up failed", name)
                raise ModelLoadFailed(f"model {name!r}: warm-up failed: {exc}") from None
            old = self._models.get(name)
            self._models[name] = model  # from here on, new requests for `name` reach the new model
            self._events.model_loaded(self.describe(name))
            if old is not None:
                await old.stop(drain_timeout_s)
                log.info("model %r replaced; the old one answered what it had accepted", name)
        return self.describe(name)

    async def unload_model(self, name: str, *, drain_timeout_s: float) -> None:
        """Stop serving `name`: new requests for it get 404; those it accepted are answered (bounded drain)."""
        async with self._control:
            served = self.model(name)
            if name == self.default_model:
                raise Conflict(f"model {name!r} is the default model and cannot be unloaded; it can be reloaded")
            del self._models[name]
            self._events.model_unloaded(name)
            await served.stop(drain_timeout_s)
            log.info("model %r unloaded", name, extra={"fields": {"model": name}})

    def begin_shutdown(self) -> None:
        """Not ready from now on, and new requests are refused with 503; what was accepted goes on to the end."""
        self._stopping = True

    async def stop(self, timeout_s: float = 30.0) -> None:
        """Not ready from now on; finish what was accepted (bounded), then release the threads."""
        self._stopping = True
        await asyncio.gather(*(m.stop(timeout_s) for m in self._models.values()))
        self.decode_pool.shutdown()

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def classify(
        self,
        images: Sequence[bytes],
        *,
        model: str | None = None,
        top_k: int | None = None,
        logits: bool = True,
        timeout_s: float | None = None,
    ) -> Classification:
        """Classify encoded images, each its own batch item; one prediction per image, in order.

        `top_k` defaults to 5, or every class for a model with fewer.
        """
        served = self.model(model)
        k = checked_top_k(served.num_classes, top_k)
        inference = await self.infer(images, model=served.name, timeout_s=timeout_s)
        predictions = [postprocess.top_k(o, k, served.labels, with_logits=logits) for o in inference.outputs]
        return Classification(served.name, predictions, inference.timings)

    async def embed(
        self,
        images: Sequence[bytes],
        *,
        model: str | None = None,
        normalize: bool = False,
        timeout_s: float | None = None,
    ) -> Embeddings:
        """Encoded images -> their embeddings (the representation the model's head reads), from the same batches
        and the same forward as `classify`; L2-normalised with `normalize`."""
        served = self.model(model)
        if not served.embedding_dim:
            raise InvalidParameter(
                f"model {served.name!r} is served without embeddings: its head could not be split off",
                code="embedding_unsupported",
            )
        inference = await self.infer(images, model=served.name, timeout_s=timeout_s)
        vectors = postprocess.embeddings([o.embedding for o in inference.outputs], normalize=normalize)
        return Embeddings(served.name, vectors, normalize, inference.timings)

    async def explain(
        self,
        images: Sequence[bytes],
        *,
        model: str | None = None,
        top_k: int | None = None,
        overlay: bool = False,
        timeout_s: float | None = None,
    ) -> Explanations:
        """Encoded images -> top-k classes and attention-rollout maps (and PNG overlays), through the model's
        explain queue: an eager forward that keeps every layer's attention, apart from the classify batches."""
        served = self.model(model)
        if served.explainer is None:
            raise InvalidParameter(
                f"model {served.name!r} cannot be explained: its attention weights cannot be read",
                code="explain_unsupported",
            )
        k = checked_top_k(served.num_classes, top_k)
        explained, timings = await self._run(
            served,
            served.explainer.batcher,
            len(images),
            lambda deadline: self._prepare_all(served, images, served.prepare_on_cpu, deadline),
            timeout_s,
            encoded_bytes=sum(map(len, images)),
        )
        overlays: list[bytes | None] = [None] * len(explained)
        if overlay:
            overlays = list(
                await asyncio.gather(*(self.decode_pool.run(served.explainer.overlay_png, e) for e in explained))
            )
        results = [
            Explanation(postprocess.top_k(e.output, k, served.labels, with_logits=False), e.heat.numpy(), png)
            for e, png in zip(explained, overlays, strict=True)
        ]
        return Explanations(served.name, results, timings)

    async def infer(
        self, images: Sequence[bytes], *, model: str | None = None, timeout_s: float | None = None
    ) -> Inference:
        """Encoded images -> the model's outputs, one per image, in order (decoded and preprocessed here)."""
        served = self.model(model)
        outputs, timings = await self._run(
            served,
            served.batcher,
            len(images),
            lambda deadline: self._prepare_all(served, images, served.prepare, deadline),
            timeout_s,
            encoded_bytes=sum(map(len, images)),
        )
        return Inference(served.name, outputs, timings)

    async def infer_pixels(
        self, pixels: torch.Tensor, *, model: str | None = None, timeout_s: float | None = None
    ) -> Inference:
        """Already-preprocessed images, (n, 3, h, w) float32 at the model's input size -> the model's outputs."""
        served = self.model(model)
        expected = served.input_shape
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != expected:
            raise BadRequest(
                f"pixels must have shape [N, {', '.join(map(str, expected))}], not {list(pixels.shape)}",
                code="invalid_shape",
            )

        async def split(deadline: float) -> list[Prepared]:
            return list(pixels.float().unbind(0))

        outputs, timings = await self._run(served, served.batcher, pixels.shape[0], split, timeout_s)
        return Inference(served.name, outputs, timings)

    async def _run(
        self,
        served: ServedModel,
        batcher: Batcher[In, Out],
        count: int,
        prepare: Callable[[float], Awaitable[list[In]]],  # given the request's deadline (the loop's clock)
        timeout_s: float | None,
        *,
        encoded_bytes: int = 0,
    ) -> tuple[list[Out], Timings]:
        """The one request path: limits, admission, prepare, the batcher, a deadline over all of it."""
        if self._stopping:
            raise NotReady("the service is shutting down; send this request to another replica")
        if not self._started:
            raise NotReady(f"not ready: {self.not_ready_reason()}; retry once /readyz answers 200")
        if count == 0:
            raise BadRequest("the request holds no image", code="no_image")
        if count > self.limits.max_images_per_request:
            raise PayloadTooLarge(
                f"{count} images in one request; the limit is {self.limits.max_images_per_request}",
                code="too_many_images",
            )
        limit = self.request_timeout_s(served)
        timeout = limit if timeout_s is None else min(timeout_s, limit)
        deadline = asyncio.get_running_loop().time() + timeout
        tracer = self._events.tracer
        trace = tracer.request(served.name, count)
        stage = NO_STAGE  # a request refused at once has no stages
        try:
            async with asyncio.timeout_at(deadline):
                with batcher.admit(count, encoded_bytes=encoded_bytes) as admission:  # 503 at once when full
                    stage = Stage(tracer, trace, "preprocess")
                    started = time.perf_counter()
                    tensors = await prepare(deadline)
                    preprocess_s = time.perf_counter() - started
                    stage = stage.next("queue")
                    futures = admission.submit(tensors, deadline, trace)
                try:
                    completed = await asyncio.gather(*futures)
                except ServeError as error:  # one image failed in its batch (e.g. the device could not decode it)
                    raise _at_image(error, futures) from None
                finally:
                    for future in futures:  # after an error or a cancel, drop this request's other images
                        future.cancel()
        except TimeoutError:
            exceeded = DeadlineExceeded(f"request did not finish within {timeout:g} s")
            stage.end(error=exceeded)
            raise exceeded from None
        except BaseException as error:
            stage.end(error=error)
            raise
        timings = Timings(
            preprocess_s=preprocess_s,
            queue_wait_s=max(c.queue_wait_s for c in completed),
            inference_s=max(c.batch_s for c in completed),
        )
        stage.end(seconds=timings.queue_wait_s)  # the queue, until the last of its images was taken into a batch
        return [c.value for c in completed], timings

    def request_timeout_s(self, served: ServedModel) -> float:
        """A request's deadline: as set; or 30 s, longer on a device that the warm-up measured slower than 4 of this
        model's largest batches in 30 s (a CPU), so that a request of a few images is not cut short there."""
        if self.limits.request_timeout_s is not None:
            return self.limits.request_timeout_s
        measured = served.measured
        if measured is None:
            return DEFAULT_REQUEST_TIMEOUT_S
        batches_s = TIMEOUT_IN_BATCHES * measured.batch_size / max(measured.images_per_s, 1e-3)
        return max(DEFAULT_REQUEST_TIMEOUT_S, round(batches_s))

    async def _prepare_all(
        self,
        served: ServedModel,
        images: Sequence[bytes],
        prepare: Callable[[bytes, ImageLimits], T],
        deadline: float,
    ) -> list[T]:
        """`prepare` (decode and preprocess) every image in the pool, in parallel; the first bad image (in order)
        fails all."""
        limits = self.limits.image
        results = await asyncio.gather(
            *(self.decode_pool.run(_timed, prepare, data, limits, deadline=deadline) for data in images),
            return_exceptions=True,
        )
        tensors: list[T] = []
        for index, result in enumerate(results):
            if isinstance(result, ServeError):
                raise result.at(index)
            if isinstance(result, BaseException):
                raise result
            tensor, seconds = result
            self._events.image_prepared(served.name, seconds)
            tensors.append(tensor)
        return tensors


async def _warm(model: ServedModel) -> None:
    """Warm a model up (`ServedModel.warm_up`: its lanes, buckets and the timed batches) and start its batcher."""
    started = time.perf_counter()
    await model.start()
    seconds = time.perf_counter() - started
    measured = model.measured
    log.info(
        "model %r warmed up in %.2f s%s",
        model.name,
        seconds,
        f": {measured.images_per_s:g} images/s at batch {measured.batch_size}, {measured.latency_ms_batch1:.0f} ms "
        "for one image alone"
        if measured
        else "",
        extra={
            "fields": {
                "model": model.name,
                "warmup_s": round(seconds, 3),
                **({"measured": dataclasses.asdict(measured)} if measured else {}),
            }
        },
    )


def checked_top_k(num_classes: int, top_k: int | None) -> int:
    """`top_k` checked against a model of `num_classes`, or its default: 5, or every class for a model with fewer."""
    k = min(DEFAULT_TOP_K, num_classes) if top_k is None else top_k
    if not 1 <= k <= num_classes:
        raise InvalidParameter(f"top_k must be between 1 and {num_classes}, not {k}")
    return k


def _at_image(error: ServeError, futures: Sequence[asyncio.Future[Completed[Any]]]) -> ServeError:
    """A client's fault (this image's) pinned to the image whose future failed with it."""
    if not error.fault.clients:  # the batch's or the service's fault, not one image's
        return error
    for index, future in enumerate(futures):
        if future.done() and not future.cancelled() and future.exception() is error:
            return error.at(index)
    return error


def _timed(prepare: Callable[[bytes, ImageLimits], T], data: bytes, limits: ImageLimits) -> tuple[T, float]:
    started = time.perf_counter()
    tensor = prepare(data, limits)
    return tensor, time.perf_counter() - started
