"""Three replicas behind a real nginx on loopback, with the shipped balancer rules: under load, one replica is
stopped with SIGTERM and another killed with SIGKILL, and every request still gets its own correct answer."""

from __future__ import annotations

import io
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.support.load_balancer import access_log, nginx
from tests.support.processes import ServerProcess, drained, free_port, start_tiny, wait_ready, write_tiny_model

pytestmark = pytest.mark.slow

REQUESTS = 300
CLIENTS = 8
STOP_AT = REQUESTS // 3  # answers received before replica 0 gets SIGTERM
KILL_AT = 2 * REQUESTS // 3  # answers received before replica 1 gets SIGKILL
CLASSIFY = "/v1/classify?top_k=3"


def noise_png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def replicas(tmp_path: Path) -> Iterator[list[tuple[ServerProcess, str]]]:
    """Three server processes of the same tiny model, each on its own port, all ready."""
    repository = tmp_path / "models"
    write_tiny_model(repository)
    ports = [free_port() for _ in range(3)]
    # One decode thread and one torch thread each: three replicas, nginx and the client share two cores.
    servers = [start_tiny(repository, port, "--decode-workers", "1", "--torch-threads", "1") for port in ports]
    try:
        for server, port in zip(servers, ports, strict=True):
            wait_ready(server, f"http://127.0.0.1:{port}")
        yield [(server, f"127.0.0.1:{port}") for server, port in zip(servers, ports, strict=True)]
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.process.kill()
            server.wait(timeout_s=10)  # also closes its log file


def test_every_request_is_answered_while_replicas_stop_and_die(
    replicas: list[tuple[ServerProcess, str]], tmp_path: Path
) -> None:
    images = [noise_png(seed) for seed in range(6)]
    survivor = replicas[2][1]
    with httpx.Client(base_url=f"http://{survivor}", timeout=30) as direct:
        expected = [direct.post(CLASSIFY, content=image).json()["predictions"][0] for image in images]
    assert len({tuple(p["logits"]) for p in expected}) == len(images)  # different images, different answers

    (stopped, _), (killed, killed_address) = replicas[0], replicas[1]
    balancer = tmp_path / "nginx"
    with ExitStack() as stack:
        url = stack.enter_context(nginx(balancer, free_port(), [address for _, address in replicas]))
        client = stack.enter_context(httpx.Client(base_url=url, timeout=60))
        pool = stack.enter_context(ThreadPoolExecutor(CLIENTS))
        answered = threading.Semaphore(0)

        def classify(i: int) -> tuple[int, httpx.Response]:
            try:
                return i, client.post(CLASSIFY, content=images[i % len(images)])
            finally:
                answered.release()

        futures = [pool.submit(classify, i) for i in range(REQUESTS)]
        for _ in range(STOP_AT):
            answered.acquire()
        stopped.process.send_signal(signal.SIGTERM)  # drains what it accepted, refuses the rest
        for _ in range(KILL_AT - STOP_AT):
            answered.acquire()
        killed.process.send_signal(signal.SIGKILL)  # whatever it held is lost: nginx sends it again
        results = dict(future.result() for future in as_completed(futures))

    assert len(results) == REQUESTS
    for i, response in sorted(results.items()):
        assert response.status_code == 200, (i, response.status_code, response.text)
        prediction, want = response.json()["predictions"][0], expected[i % len(images)]
        assert [c["index"] for c in prediction["top_k"]] == [c["index"] for c in want["top_k"]]
        np.testing.assert_allclose(prediction["logits"], want["logits"], rtol=1e-4, atol=1e-4)

    # It drained and exited 0 (`drained` checks). That a drain answers what was in flight is test_shutdown's proof.
    assert '"signal":"SIGTERM"' in drained(stopped)
    killed.wait(timeout_s=10)
    assert killed.process.returncode == -signal.SIGKILL
    forwarded = [entry for entry in access_log(balancer) if entry.uri.startswith("/v1/classify")]
    assert len(forwarded) == REQUESTS and {entry.status for entry in forwarded} == {200}
    assert {entry.replicas[-1] for entry in forwarded} == {address for _, address in replicas}  # all took part
    retried = [entry.replicas for entry in forwarded if len(entry.replicas) > 1]
    assert any(killed_address in tried[:-1] for tried in retried)  # what the killed replica failed went elsewhere
