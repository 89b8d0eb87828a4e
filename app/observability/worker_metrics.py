"""Metrics read from a process rather than counted (queue depth, readiness, memory, CPU), for one of several workers.

One process answers them at scrape time with collectors (`app.observability.metrics`). With several workers the
scrape reaches one of them, so each worker instead samples its own values every second into prometheus-client's
multiprocess files, where each metric's `multiprocess_mode` says how the workers combine: summed (queue depth,
device memory), the least (readiness: ready only when every worker is), or one series per worker with a `pid` label
(memory, open files).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, ProcessCollector

from app.engine.descriptions import ModelStatus

CUDA_MEMORY: dict[str, tuple[str, Callable[[int], int]]] = {
    "vit_cuda_memory_allocated_bytes": ("Device memory held by tensors.", torch.cuda.memory_allocated),
    "vit_cuda_memory_reserved_bytes": ("Device memory held by PyTorch's allocator.", torch.cuda.memory_reserved),
    "vit_cuda_memory_peak_allocated_bytes": (
        "Most device memory held by tensors since start.",
        torch.cuda.max_memory_allocated,
    ),
}
# How each worker's sample combines: peak is the largest worker's peak, the others add up.
CUDA_MEMORY_MODES: dict[str, Literal["livemax", "livesum"]] = {"vit_cuda_memory_peak_allocated_bytes": "livemax"}
# ProcessCollector's gauges, one series per live worker; its CPU counter is summed (dead workers' CPU included).
PROCESS_GAUGES = ("process_resident_memory_bytes", "process_virtual_memory_bytes", "process_open_fds")
PROCESS_CPU = "process_cpu_seconds"
SAMPLE_INTERVAL_S = 1.0


def cuda_memory_ready() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_initialized()  # type: ignore[no-untyped-call]


class WorkerSampler:
    """Every `interval_s`, on a thread of its own, writes this worker's sampled values to its metrics."""

    def __init__(
        self,
        models: Callable[[], Sequence[str]],
        status: Callable[[str], ModelStatus],
        queue_depth: Gauge,
        model_ready: Gauge,
        registry: CollectorRegistry,
        interval_s: float = SAMPLE_INTERVAL_S,
    ) -> None:
        self.models = models  # the names of the models served now
        self.status = status
        self.queue_depth = queue_depth
        self.model_ready = model_ready
        self.interval_s = interval_s
        self.cuda_memory = {
            name: Gauge(
                name, doc, ["device"], multiprocess_mode=CUDA_MEMORY_MODES.get(name, "livesum"), registry=registry
            )
            for name, (doc, _) in CUDA_MEMORY.items()
        }
        self.process = {
            name: Gauge(name, f"{name}, per worker.", multiprocess_mode="liveall", registry=registry)
            for name in PROCESS_GAUGES
        }
        self.cpu = Counter(PROCESS_CPU, "User and system CPU time of the workers, in seconds.", registry=registry)
        self._process_collector = ProcessCollector(registry=None)
        self._counted_cpu = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.sample()
        self._thread = threading.Thread(target=self._run, name="metrics-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2 * self.interval_s)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        for name in self.models():
            status = self.status(name)
            self.queue_depth.labels(name).set(status.queue_depth)
            self.model_ready.labels(name).set(float(status.ready))
        if cuda_memory_ready():
            for name, (_, read) in CUDA_MEMORY.items():
                for index in range(torch.cuda.device_count()):
                    self.cuda_memory[name].labels(f"cuda:{index}").set(read(index))
        for family in self._process_collector.collect():
            for sample in family.samples:
                if sample.name in self.process:
                    self.process[sample.name].set(sample.value)
                elif sample.name == f"{PROCESS_CPU}_total" and sample.value > self._counted_cpu:
                    self.cpu.inc(sample.value - self._counted_cpu)
                    self._counted_cpu = sample.value
