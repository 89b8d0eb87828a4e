"""Soak: 20,000 mixed requests against a real server process; memory, file descriptors and threads stay flat.

Not in the default run (about three minutes on two cores): `make soak`, or `pytest -m soak`. Set SOAK_REQUESTS to
change the count.
"""

from __future__ import annotations

import io
import os
import struct
import threading
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.support.processes import chelsea_jpeg, tiny_server

pytestmark = [pytest.mark.soak, pytest.mark.slow, pytest.mark.timeout(3600)]
REQUESTS = int(os.environ.get("SOAK_REQUESTS", "20000"))
WARMUP = REQUESTS // 10
CLIENTS = 8


def resources(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {
        "rss_bytes": int(fields["VmRSS"].split()[0]) * 1024,
        "threads": int(fields["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def mixed_requests(jpeg: bytes) -> list[tuple[str, dict[str, object], int]]:
    """(path, httpx arguments, expected status): the paths a day of real traffic takes, good and bad."""
    png = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(png, format="PNG")
    header = (
        b'{"inputs":[{"name":"IMAGE","datatype":"BYTES","shape":[1,1],"parameters":{"binary_data_size":%d}}],'
        b'"outputs":[{"name":"LOGITS","parameters":{"classification":3}}]}' % (len(jpeg) + 4)
    )
    raw: dict[str, object] = {"content": jpeg, "headers": {"Content-Type": "image/jpeg"}}
    return [
        *[("/v1/classify?logits=false", raw, 200)] * 6,
        (
            "/v1/classify",
            {"files": [("a", ("a.jpg", jpeg, "image/jpeg")), ("b", ("b.png", png.getvalue(), "image/png"))]},
            200,
        ),
        (
            "/v2/models/tiny/infer",
            {
                "content": header + struct.pack("<I", len(jpeg)) + jpeg,
                "headers": {"Inference-Header-Content-Length": str(len(header))},
            },
            200,
        ),
        ("/v1/classify", {"content": jpeg[: len(jpeg) // 3], "headers": {"Content-Type": "image/jpeg"}}, 400),
        ("/v1/classify", {"json": {"images": ["not base64!"]}}, 400),
    ]


def test_20000_requests_leave_memory_fds_and_threads_flat(tmp_path: Path, record_property: object) -> None:
    jpeg = chelsea_jpeg()
    mix = mixed_requests(jpeg)
    counter = iter(range(REQUESTS))
    lock = threading.Lock()
    failures: list[str] = []
    warm = threading.Barrier(CLIENTS + 1)

    def client(url: str) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            warmed = False
            while True:
                with lock:
                    n = next(counter, None)
                if n is None:
                    break
                if n >= WARMUP and not warmed:
                    warm.wait()  # everyone pauses once, after the warm-up, while resources are read
                    warm.wait()
                    warmed = True
                path, kwargs, status = mix[n % len(mix)]
                response = http.post(path, **kwargs)  # type: ignore[arg-type]
                if response.status_code != status:
                    failures.append(f"{path}: {response.status_code} {response.text[:200]}")
            if not warmed:
                warm.wait()
                warm.wait()

    with tiny_server(tmp_path, "--max-batch-size", "8") as (url, server):
        threads = [threading.Thread(target=client, args=(url,)) for _ in range(CLIENTS)]
        for thread in threads:
            thread.start()
        warm.wait()
        after_warmup = resources(server.process.pid)
        warm.wait()
        for thread in threads:
            thread.join()
        at_end = resources(server.process.pid)

    print(f"\nsoak: {REQUESTS} requests; after warm-up ({WARMUP}) {after_warmup}; at the end {at_end}")
    assert not failures, failures[:5]
    assert at_end["rss_bytes"] <= after_warmup["rss_bytes"] * 1.10
    assert at_end["fds"] <= after_warmup["fds"] + 2  # keep-alive connections come and go
    assert at_end["threads"] <= after_warmup["threads"]
