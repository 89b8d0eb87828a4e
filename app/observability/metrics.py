"""Every Prometheus metric of the service, declared here (and the sampled ones of `workers` in `worker_metrics`), in a
registry of its own. With several workers, prometheus-client's multiprocess mode sums them across the processes."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from app.engine.descriptions import Agreement, BatchRecord, ModelInfo, ModelStatus
from app.errors import (
    ClientDisconnected,
    DeadlineExceeded,
    ModelNotFound,
    NotReady,
    QueueFull,
    ServeError,
)
from app.observability.worker_metrics import CUDA_MEMORY, WorkerSampler, cuda_memory_ready

# Sub-millisecond to a minute: a probe, a CPU forward of ViT-B at batch 1, a loaded queue, a timeout.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.075, 0.1,
    0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
)  # fmt: skip

REJECTION_REASONS = ("queue_full", "deadline", "cancelled", "invalid_input", "not_ready", "error")
OTHER_MODEL = "other"  # the label of a request for a model never served: a name a client made up is no label


class Metrics:
    """The service's metrics: an `EngineObserver` (`engine.observe(metrics)`), counting what the engine reports
    (batches, their splits, decode times, models loaded and unloaded), and what the HTTP layer reports (requests,
    rejections). `status` reads a served model's queue depth and readiness (`Engine.status`); `max_batch_size`, the
    largest batch of any model, sizes the batch-size histogram.

    `registry` is what `/metrics` exposes. With `multiprocess_dir` (one of several workers, started with
    PROMETHEUS_MULTIPROC_DIR set to it) the metrics are written there and `registry` reads every worker's files; the
    values read from the process at scrape time (queue depth, readiness, memory) are then sampled every second by a
    `WorkerSampler` between `start()` and `stop()`: prometheus-client's multiprocess mode has no scrape-time gauges.
    """

    def __init__(
        self,
        *,
        max_batch_size: int,
        status: Callable[[str], ModelStatus],
        registry: CollectorRegistry | None = None,
        multiprocess_dir: Path | None = None,
    ) -> None:
        # No `*_created` series: they double the series count and no dashboard here reads them. (Process-wide.)
        disable_created_metrics()  # type: ignore[no-untyped-call]
        r = CollectorRegistry() if multiprocess_dir is not None else registry or CollectorRegistry()
        self.requests = Counter(
            "vit_requests", "HTTP requests answered, by route and status.", ["model", "endpoint", "code"], registry=r
        )
        self.request_duration = Histogram(
            "vit_request_duration_seconds",
            "End-to-end request time as the server sees it.",
            ["model", "endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "vit_inflight_requests", "HTTP requests being handled now.", multiprocess_mode="livesum", registry=r
        )
        self.images = Counter("vit_images", "Images run through the model.", ["model"], registry=r)
        self.queue_depth = Gauge(
            "vit_queue_depth",
            "Images admitted and not yet computed (being decoded or queued).",
            ["model"],
            multiprocess_mode="livesum",
            registry=r,
        )
        self.queue_wait = Histogram(
            "vit_queue_wait_seconds",
            "Per image: time in the queue until its batch started.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.preprocess = Histogram(
            "vit_preprocess_seconds",
            "Per image: decode and preprocess, on a decode thread.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "vit_inference_seconds",
            "Per batch: the forward pass, including host/device copies.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "vit_batch_size",
            "Images per batch sent to the model (a bucket for every size).",
            ["model"],
            buckets=[float(size) for size in range(1, max_batch_size + 1)],
            registry=r,
        )
        self.rejected = Counter(
            "vit_rejected", "Requests not answered with a result, by reason.", ["model", "reason"], registry=r
        )
        self.model_ready = Gauge(
            "vit_model_ready",
            "1 when the model is loaded, warmed and serving (in every worker).",
            ["model"],
            multiprocess_mode="livemin",
            registry=r,
        )
        self.accuracy_gate = Gauge(
            "vit_accuracy_gate",
            "A model's fast path against torch fp32 on the accuracy gate's images, measured at start: top1_agreement, "
            "top5_overlap, max_relative_error, mean_relative_error (no series on the exact path).",
            ["model", "path", "measure"],
            multiprocess_mode="livemostrecent",
            registry=r,
        )
        self.oom_splits = Counter(
            "vit_oom_splits", "Batches retried in two halves after running out of device memory.", ["model"], registry=r
        )
        self.sampler: WorkerSampler | None = None
        self._multiprocess = multiprocess_dir is not None
        self._status = status
        self._served: set[str] = set()  # every model served since the start: the model labels there can be
        self._serving: set[str] = set()  # the models served now: those with gauges
        if multiprocess_dir is None:
            ProcessCollector(registry=r)
            r.register(CudaMemoryCollector())
            self.registry = r
        else:
            self.sampler = WorkerSampler(
                lambda: sorted(self._serving), self.status, self.queue_depth, self.model_ready, r
            )
            self.registry = CollectorRegistry()
            MultiProcessCollector(self.registry, str(multiprocess_dir))  # type: ignore[no-untyped-call]

    def start(self) -> None:
        """Start sampling (one of several workers only)."""
        if self.sampler is not None:
            self.sampler.start()

    def stop(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()

    def serving(self) -> list[str]:
        """The models served now (whose gauges there are)."""
        return sorted(self._serving)

    def status(self, name: str) -> ModelStatus:
        """A served model's status now; a model unloaded meanwhile has none left (no queue, not ready)."""
        try:
            return self._status(name)
        except ModelNotFound:
            return ModelStatus(ready=False, queue_depth=0)

    def model_loaded(self, model: ModelInfo) -> None:
        """Every series of a model exists from its start, at zero; its gauges read its status (one process)."""
        name = model.name
        self._served.add(name)
        self._serving.add(name)
        for family in (self.images, self.queue_wait, self.preprocess, self.inference, self.batch_size, self.oom_splits):
            family.labels(name)
        for reason in REJECTION_REASONS:
            self.rejected.labels(name, reason)
        if not self._multiprocess:  # the workers' sampler sets them
            self.queue_depth.labels(name).set_function(lambda: self.status(name).queue_depth)
            self.model_ready.labels(name).set_function(lambda: float(self.status(name).ready))

    def model_unloaded(self, name: str) -> None:
        """Its gauges go (a model not served has no queue); its counters stay, as counters do."""
        self._serving.discard(name)
        for gauge in (self.queue_depth, self.model_ready):
            with contextlib.suppress(KeyError):
                gauge.remove(name)

    def image_prepared(self, model: str, seconds: float) -> None:
        self.preprocess.labels(model).observe(seconds)

    def batch_split(self, model: str, size: int) -> None:
        self.oom_splits.labels(model).inc()

    def accuracy_measured(self, model: str, agreement: Agreement) -> None:
        for measure, value in agreement.measures().items():
            self.accuracy_gate.labels(model, agreement.path, measure).set(value)

    def batch_done(self, model: str, record: BatchRecord) -> None:
        self.batch_size.labels(model).observe(record.size)
        self.inference.labels(model).observe(record.run_s)
        queue_wait = self.queue_wait.labels(model)
        for wait in record.queue_waits_s:
            queue_wait.observe(wait)
        if not record.failed:
            self.images.labels(model).inc(record.size)

    def request_rejected(self, model: str, error: ServeError) -> None:
        self.rejected.labels(self.model_label(model), rejection_reason(error)).inc()

    def model_label(self, model: str) -> str:
        """`model` if it has been served, "" for none named, else `OTHER_MODEL`: labels stay a bounded set."""
        return model if not model or model in self._served else OTHER_MODEL


def rejection_reason(error: ServeError) -> str:
    if isinstance(error, QueueFull):
        return "queue_full"
    if isinstance(error, DeadlineExceeded):
        return "deadline"
    if isinstance(error, ClientDisconnected):
        return "cancelled"
    if isinstance(error, NotReady):
        return "not_ready"
    if error.fault.clients:
        return "invalid_input"
    return "error"


class CudaMemoryCollector(Collector):
    """Device memory per CUDA device, read at scrape time; nothing where there is no GPU."""

    def collect(self) -> Iterator[Metric]:
        if not cuda_memory_ready():
            return
        for name, (documentation, read) in CUDA_MEMORY.items():
            family = GaugeMetricFamily(name, documentation, labels=["device"])
            for index in range(torch.cuda.device_count()):
                family.add_metric([f"cuda:{index}"], read(index))
            yield family
