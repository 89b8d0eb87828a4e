"""`--workers N`: one port, N server processes, a supervisor that replaces a dead one, metrics summed over them."""

from __future__ import annotations

import os
import re
import signal
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from prometheus_client import CollectorRegistry, Gauge

from app.config.settings import Settings
from app.engine.descriptions import ModelStatus
from app.observability.worker_metrics import CUDA_MEMORY, WorkerSampler
from tests.support.photos import jpeg, photo
from tests.support.processes import access_lines, free_port, start_tiny, stop, tiny_server

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")  # processes started by the tests


def scrape(url: str) -> str:
    response = httpx.get(f"{url}/metrics", timeout=10)
    assert response.status_code == 200
    return response.text


def value(metrics: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", metrics, re.MULTILINE)
    assert match is not None, f"{series} not in:\n{metrics}"
    return float(match.group(1))


def worker_pids(metrics: str) -> set[int]:
    return {int(pid) for pid in re.findall(r'^process_resident_memory_bytes\{pid="(\d+)"\}', metrics, re.MULTILINE)}


def classify_many(url: str, images: list[bytes]) -> list[httpx.Response]:
    """Each request on a connection of its own, 8 at a time, so that both workers take some."""

    def one(data: bytes) -> httpx.Response:
        return httpx.post(f"{url}/v1/classify", files={"image": ("x.jpg", data, "image/jpeg")}, timeout=60)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(one, images))


def wait_for(condition: object, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


def both_ready(url: str) -> None:
    """The port answers as soon as one worker is ready; wait for the second too."""
    wait_for(lambda: len(worker_pids(scrape(url))) == 2)


def scores(response: httpx.Response) -> dict[int, float]:
    return {entry["index"]: entry["score"] for entry in response.json()["predictions"][0]["top_k"]}


def distance(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[index] - b.get(index, 0.0)) for index in a)


@pytest.mark.slow
def test_workers_share_the_port_answer_each_request_and_their_metrics_add_up(tmp_path: Path) -> None:
    images = [jpeg(photo("chelsea")), jpeg(photo("coffee"))] * 20
    with tiny_server(tmp_path, "--workers", "2") as (url, server):
        both_ready(url)
        answers = classify_many(url, images)
        assert [r.status_code for r in answers] == [200] * len(images)
        by_image: dict[bytes, list[dict[int, float]]] = {}
        for data, response in zip(images, answers, strict=True):
            by_image.setdefault(data, []).append(scores(response))
        first, second = by_image.values()
        assert all(distance(first[0], other) < 1e-5 for other in first)  # the same image, the same answer
        assert all(distance(second[0], other) < 1e-5 for other in second)
        assert distance(first[0], second[0]) > 1e-3  # and each image its own

        metrics = scrape(url)
        assert value(metrics, 'vit_requests_total{code="200",endpoint="/v1/classify",model="tiny"}') == len(images)
        assert value(metrics, 'vit_images_total{model="tiny"}') == len(images)
        assert value(metrics, 'vit_batch_size_sum{model="tiny"}') == len(images)
        assert value(metrics, 'vit_model_ready{model="tiny"}') == 1.0
        # Sampled every second: the queue has emptied by the next sample.
        wait_for(lambda: value(scrape(url), 'vit_queue_depth{model="tiny"}') == 0.0, timeout_s=10)
        assert value(metrics, "process_cpu_seconds_total") > 0

        output = stop(server)  # SIGTERM to the supervisor: each worker drains, and all exit 0
    answered_by = {line["pid"] for line in access_lines(output) if line["path"] == "/v1/classify"}
    assert len(answered_by) == 2  # both workers took connections
    # The start barrier: no worker took a connection before both were warm.
    lines = output.splitlines()
    warm = [n for n, line in enumerate(lines) if "warm; waiting for the others" in line]
    taking = [n for n, line in enumerate(lines) if re.search(r"worker \d+ taking connections", line)]
    assert len(warm) == len(taking) == 2 and max(warm) < min(taking)
    assert output.count("Application shutdown complete") == 2
    assert "all workers stopped; exiting with status 0" in output


@pytest.mark.slow
def test_a_killed_worker_is_replaced_while_the_other_serves_and_its_gauges_leave(tmp_path: Path) -> None:
    data = jpeg(photo("chelsea"))
    with tiny_server(tmp_path, "--workers", "2") as (url, server):
        both_ready(url)
        before = worker_pids(scrape(url))
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        # The other worker answers everything meanwhile: no request fails while the dead one is replaced.
        answers = classify_many(url, [data] * 16)
        assert [r.status_code for r in answers] == [200] * 16

        def replaced() -> bool:
            pids = worker_pids(scrape(url))
            return len(pids) == 2 and victim not in pids

        wait_for(replaced)
        assert f"(pid {victim}) exited with status -9" in server.output()
        assert value(scrape(url), 'vit_model_ready{model="tiny"}') == 1.0


@pytest.mark.slow
def test_a_worker_that_cannot_start_stops_the_supervisor_with_status_1(tmp_path: Path) -> None:
    (tmp_path / "tiny").mkdir()  # a model folder without weights or config
    server = start_tiny(tmp_path, free_port(), "--workers", "2")
    output = server.wait(timeout_s=120)
    assert server.process.returncode == 1, output
    assert "before it was ready: stopping" in output
    assert "all workers stopped; exiting with status 1" in output


@pytest.mark.slow
def test_workers_drain_by_themselves_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    with tiny_server(tmp_path, "--workers", "2") as (url, server):
        both_ready(url)
        pids = worker_pids(scrape(url))
        server.process.send_signal(signal.SIGKILL)
        server.wait(timeout_s=10)

        def all_gone() -> bool:
            return not any(_alive(pid) for pid in pids)

        wait_for(all_gone, timeout_s=30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_workers_split_the_cores_and_the_device_memory_between_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    one = Settings(batch_memory_fraction=0.6)
    four = Settings(workers=4, batch_memory_fraction=0.6)
    assert (one.resolved_decode_workers(), one.resolved_torch_threads()) == (16, None)
    assert (four.resolved_decode_workers(), four.resolved_torch_threads()) == (4, 4)
    assert Settings(workers=4, torch_threads=2, decode_workers=8).resolved_torch_threads() == 2
    assert Settings(workers=4, decode_workers=8).resolved_decode_workers() == 8
    assert one.acceleration().batch_memory_fraction == pytest.approx(0.6)
    assert four.acceleration().batch_memory_fraction == pytest.approx(0.15)
    assert Settings(workers=64).resolved_decode_workers() == 1


def test_a_workers_sampler_writes_what_one_process_reads_at_scrape_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """The values a single process reads at scrape time, written by a worker's sampler instead: each served model's
    queue depth and readiness (from its status), device memory, its own memory and CPU."""
    statuses = {"m": ModelStatus(ready=False, queue_depth=3), "n": ModelStatus(ready=True, queue_depth=0)}
    registry = CollectorRegistry()
    queue_depth = Gauge("vit_queue_depth", "", ["model"], registry=registry)
    ready = Gauge("vit_model_ready", "", ["model"], registry=registry)
    sampler = WorkerSampler(lambda: sorted(statuses), statuses.__getitem__, queue_depth, ready, registry)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    for name in CUDA_MEMORY:
        monkeypatch.setitem(CUDA_MEMORY, name, ("", lambda index: 1234))

    sampler.sample()
    statuses["m"] = ModelStatus(ready=True, queue_depth=1)
    sampler.sample()

    def read(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert (read("vit_queue_depth", model="m"), read("vit_model_ready", model="m")) == (1.0, 1.0)
    assert (read("vit_queue_depth", model="n"), read("vit_model_ready", model="n")) == (0.0, 1.0)
    assert read("vit_cuda_memory_allocated_bytes", device="cuda:0") == 1234
    assert (read("process_resident_memory_bytes") or 0) > 10_000_000
    assert (read("process_cpu_seconds_total") or 0) > 0


@pytest.mark.slow
def test_sigterm_while_the_workers_start_stops_them_all_and_exits_0(tmp_path: Path) -> None:
    from tests.support.processes import write_tiny_model

    write_tiny_model(tmp_path)
    server = start_tiny(tmp_path, free_port(), "--workers", "2")
    # Once the supervisor runs (its first line), before any worker is ready: they are still importing torch or loading
    # the model. (A signal before the interpreter has even imported the supervisor ends it as the signal says.)
    deadline = time.monotonic() + 60
    while "worker 0 started" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.01)
    server.process.send_signal(signal.SIGTERM)
    output = server.wait(timeout_s=60)
    assert server.process.returncode == 0, output
    assert "all workers stopped; exiting with status 0" in output


def test_a_signal_before_the_supervisor_starts_a_worker_is_a_clean_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM while the supervisor binds the port (before its own handler, before any worker): status 0, no worker,
    and the handlers it found are back."""
    from app.serve import workers

    mkdtemp = tempfile.mkdtemp

    def signalled_mkdtemp(prefix: str) -> str:
        signal.raise_signal(signal.SIGTERM)  # handled at once, in this thread: unhandled, it would end pytest
        return mkdtemp(prefix=prefix)

    monkeypatch.setattr(tempfile, "mkdtemp", signalled_mkdtemp)  # the module app.serve.workers calls
    started: list[int] = []
    monkeypatch.setattr(workers.Supervisor, "start_worker", lambda self, index, failures=0: started.append(index))
    before = signal.getsignal(signal.SIGTERM)
    assert workers.supervise(Settings(workers=2, port=free_port(), host="127.0.0.1")) == 0
    assert started == []
    assert signal.getsignal(signal.SIGTERM) is before
