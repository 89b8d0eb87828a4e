"""bench/loadgen.py against a stdlib keep-alive server that fails every fifth request."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from bench.loadgen import run

BODY = bytes(range(256)) * 40  # 10 KiB, every byte value


@dataclass
class Seen:
    lengths: list[int] = field(default_factory=list)
    intact: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    seen: Seen

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        with self.seen.lock:
            self.seen.lengths.append(len(body))
            self.seen.intact += (
                body == BODY
                and self.headers["Content-Type"] == "image/jpeg"
                and self.headers["Authorization"] == "Bearer token"
            )
            nth = len(self.seen.lengths)
        answer = b'{"ok": true}'
        self.send_response(503 if nth % 5 == 0 else 200)
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[tuple[str, Seen]]:
    seen = Seen()
    handler = type("RecordingHandler", (Handler,), {"seen": seen})
    with ThreadingHTTPServer(("127.0.0.1", 0), handler) as httpd:
        httpd.daemon_threads = True
        thread = threading.Thread(target=httpd.serve_forever, daemon=True)
        thread.start()
        yield f"http://127.0.0.1:{httpd.server_address[1]}/v1/classify?top_k=5", seen
        httpd.shutdown()
        thread.join()


def test_counts_the_measured_window_and_errors_by_status(server: tuple[str, Seen]) -> None:
    url, seen = server
    result = run(
        url,
        BODY,
        "image/jpeg",
        concurrency=4,
        duration_s=1.5,
        warmup_s=0.5,
        procs=2,
        headers={"Authorization": "Bearer token"},
    )

    assert result.procs == 2 and result.concurrency == 4 and result.duration_s == 1.5
    assert result.requests > 0
    assert result.rps == result.requests / 1.5
    assert set(result.errors) == {"503"}
    counted = result.requests + result.errors["503"]
    assert abs(result.errors["503"] - counted / 5) <= 5  # every fifth, give or take the window's two edges
    assert 0 < result.p50_ms <= result.p90_ms <= result.p99_ms <= result.max_ms
    assert result.mean_ms <= result.max_ms
    with seen.lock:
        assert seen.lengths and all(length == len(BODY) for length in seen.lengths)
        assert seen.intact == len(seen.lengths)
        assert len(seen.lengths) > counted  # the warm-up was sent, and not counted
    assert result.as_dict()["errors"] == result.errors


def test_an_unreachable_server_is_errors_not_a_hang() -> None:
    with ThreadingHTTPServer(("127.0.0.1", 0), Handler) as closed:
        port = closed.server_address[1]  # bound, then closed: nothing listens there
    result = run(f"http://127.0.0.1:{port}/", b"x", "image/jpeg", concurrency=2, duration_s=0.3, warmup_s=0, procs=1)
    assert result.requests == 0
    assert result.errors.get("ConnectionRefusedError", 0) > 0
    assert result.as_dict()["p99_ms"] is None
