"""Real `vit-serve` processes for tests: start on a free port, wait until ready, stop with SIGTERM."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import orjson
from PIL import Image
from skimage import data as skdata

from tests.support.fakes import tiny_vit, write_model_folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    """A server process and the file its stdout and stderr go to. A file, not a pipe: a pipe that nobody reads
    fills up after 64 KiB of log lines and then blocks the server's logging, and with it the event loop."""

    process: subprocess.Popen[bytes]
    log: IO[str]
    _final_output: str | None = None

    def output(self) -> str:
        if self._final_output is not None:
            return self._final_output
        self.log.seek(0)
        return self.log.read()

    def wait(self, timeout_s: float) -> str:
        """Wait for the process to exit; its whole output. Closes the log file; calling it again is fine."""
        self.process.wait(timeout=timeout_s)
        if self._final_output is None:
            self._final_output = self.output()
            self.log.close()
        return self._final_output


def start(args: list[str], *, cwd: Path, env: dict[str, str] | None = None) -> ServerProcess:
    """A `vit-serve serve` process on 127.0.0.1, without gRPC unless `args` or `env` give it a port: test servers run
    side by side, and would all take the default 8001."""
    # `python -m app.serve.cli` is the `vit-serve` entry point; it also runs where the package is on PYTHONPATH, not
    # installed (the GPU host).
    given = any(arg.startswith("--grpc-port") for arg in args) or "VIT_GRPC_PORT" in (env or {})
    grpc = [] if given else ["--grpc-port", "0"]
    command = [sys.executable, "-m", "app.serve.cli", "serve", "--host", "127.0.0.1", *grpc, *args]
    log = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115  (closed by ServerProcess.wait)
    process = subprocess.Popen(command, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log, stderr=log)
    return ServerProcess(process, log)


def wait_ready(server: ServerProcess, url: str, timeout_s: float = 120) -> None:
    wait_answering(server.process, url, server.output, timeout_s)


def wait_answering(
    process: subprocess.Popen[bytes], url: str, output: Callable[[], str], timeout_s: float = 120
) -> None:
    """Poll `url`/readyz until it answers 200; fail with the process's `output()` if it exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args!r} exited with {process.returncode}: {output()}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not become ready")


def stop(server: ServerProcess) -> str:
    """SIGTERM, as Kubernetes sends it, then `drained`."""
    server.process.send_signal(signal.SIGTERM)
    return drained(server)


def drained(server: ServerProcess) -> str:
    """Wait for a server that was sent SIGTERM: it drains, shuts its lifespan down, and exits 0. Its whole output."""
    output = server.wait(timeout_s=60)
    assert server.process.returncode == 0, output
    assert "Application shutdown complete" in output
    return output


def access_lines(output: str) -> list[dict[str, object]]:
    """A server's access log lines (JSON logs), parsed."""
    return [orjson.loads(line) for line in output.splitlines() if '"logger":"app.access"' in line]


def chelsea_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(skdata.chelsea()).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_tiny_model(repository: Path) -> None:
    """A tiny real ViT ("tiny", 64x64 input, 10 classes) in `repository`."""
    write_model_folder(repository, "tiny", tiny_vit(image_size=64, num_classes=10))


def start_tiny(repository: Path, port: int, *args: str) -> ServerProcess:
    """A server process serving the model of `write_tiny_model` on `port`."""
    return start(["--model-repository", str(repository), "--model", "tiny", "--port", str(port), *args], cwd=repository)


@contextmanager
def tiny_server(repository: Path, *args: str) -> Iterator[tuple[str, ServerProcess]]:
    """A real server process serving a tiny real ViT ("tiny", 64x64 input, 10 classes); yields its URL and process,
    and stops it with SIGTERM at the end unless the test already ended it."""
    write_tiny_model(repository)
    port = free_port()
    server = start_tiny(repository, port, *args)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(server, url)
        yield url, server
    finally:
        if server.process.poll() is None:
            stop(server)
        else:
            server.wait(timeout_s=10)  # ended by the test: close its log file


@contextmanager
def tiny_server_process(repository: Path, *args: str) -> Iterator[str]:
    with tiny_server(repository, *args) as (url, _):
        yield url
