"""Closed-loop load against a real server, and what its answers are checked with (the shutdown tests, the image's)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import pytest


@dataclass
class Outcome:
    request_id: str
    status: int | None  # None: no HTTP answer (the connection was refused or closed)
    body: bytes
    error: str = ""
    ended_after_sigterm: bool = False


def assert_same_prediction(got: dict[str, Any], want: dict[str, Any]) -> None:
    """The same classes in the same order; scores equal up to float rounding (a batch of 8 sums in another order)."""
    top, expected = got["predictions"][0]["top_k"], want["predictions"][0]["top_k"]
    assert [(c["index"], c["label"]) for c in top] == [(c["index"], c["label"]) for c in expected]
    assert [c["score"] for c in top] == pytest.approx([c["score"] for c in expected], abs=1e-5)


def metric(metrics: str, name: str) -> float:
    return float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith(name)))


def classifying(url: str) -> bool:
    """Requests are in the server now: requests other than this scrape in flight (read live, with several workers
    too) and images queued (read live in one process; sampled once a second with several workers)."""
    metrics = httpx.get(f"{url}/metrics").text
    return metric(metrics, "vit_inflight_requests ") > 1 and metric(metrics, "vit_queue_depth{") > 0


@contextmanager
def load(url: str, image: bytes, threads: int) -> Iterator[tuple[list[Outcome], threading.Event]]:
    """Closed-loop load: each thread sends one request after another, each on a new connection, until the server
    stops answering or the block ends. Yields the outcomes (filled in as they come) and an event the test sets
    when it sends SIGTERM."""
    outcomes: list[Outcome] = []
    sigterm_sent = threading.Event()
    done = threading.Event()

    def client(n: int) -> None:
        for i in range(10_000):
            if done.is_set():
                return
            request_id = f"load-{n}-{i}"
            try:
                response = httpx.post(
                    f"{url}/v1/classify?logits=false",
                    content=image,
                    headers={"Content-Type": "image/jpeg", "X-Request-ID": request_id},
                    timeout=30,
                )
                after = sigterm_sent.is_set()
                outcomes.append(Outcome(request_id, response.status_code, response.content, ended_after_sigterm=after))
            except httpx.TransportError as exc:
                after = sigterm_sent.is_set()
                outcomes.append(Outcome(request_id, None, b"", type(exc).__name__, ended_after_sigterm=after))
                if isinstance(exc, httpx.ConnectError):
                    return  # the listener is gone: this client is done

    workers = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield outcomes, sigterm_sent
    finally:
        done.set()
        for worker in workers:
            worker.join(timeout=60)
