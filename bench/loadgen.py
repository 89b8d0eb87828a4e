"""A closed-loop HTTP load generator in the standard library alone, for hosts without wrk or network access.

Concurrency C is spread over worker processes (so one GIL is not the ceiling), each running threads that own one
keep-alive connection apiece and send the same POST back to back. Every worker shares one wall-clock window: a
warm-up whose requests are sent but not counted, then the measured window. A request counts when it completes inside
the measured window: a 200 as a request and a latency, anything else as an error, by status code or exception name.

    python bench/loadgen.py --url 'http://127.0.0.1:8000/v1/classify?top_k=5' --file img.jpg \\
        --content-type image/jpeg --concurrency 16 --duration 10 --warmup 3 [--procs N] [--header 'K: V'] [--json out]
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import multiprocessing
import os
import threading
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from urllib.parse import urlsplit

REQUEST_TIMEOUT_S = 60.0
# forkserver: workers start from a clean single-threaded process (safe when the caller has threads, unlike fork),
# and the caller's main module is imported once there rather than once per worker (unlike spawn).
FORKSERVER = "forkserver" in multiprocessing.get_all_start_methods()


@dataclass(frozen=True)
class Target:
    """One request, sent again and again: where, and what."""

    scheme: str
    host: str
    port: int | None
    path: str
    body: bytes
    headers: dict[str, str]

    @classmethod
    def parse(cls, url: str, body: bytes, headers: dict[str, str]) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, parts.hostname, parts.port, path, body, headers)

    def connection(self) -> http.client.HTTPConnection:
        kind = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return kind(self.host, self.port, timeout=REQUEST_TIMEOUT_S)


@dataclass(frozen=True)
class Window:
    """Absolute `time.monotonic()` instants (one system-wide clock on Linux, so every process shares them)."""

    start: float
    measure_from: float
    end: float


@dataclass
class Tally:
    """What some threads saw inside the measured window: latencies (seconds) of 200s, and errors by kind."""

    latencies: array[float] = field(default_factory=lambda: array("d"))
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, other: Tally) -> None:
        self.latencies.extend(other.latencies)
        self.errors.update(other.errors)


@dataclass(frozen=True)
class Result:
    """One measured window. Latencies are of the 200s, in milliseconds; NaN when there were none."""

    concurrency: int
    procs: int
    requests: int
    errors: dict[str, int]
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    max_ms: float

    @classmethod
    def of(cls, tally: Tally, concurrency: int, procs: int, duration_s: float) -> Result:
        ms = sorted(latency * 1000 for latency in tally.latencies)
        n = len(ms)

        def percentile(p: int) -> float:  # nearest rank
            return ms[max(0, (p * n + 99) // 100 - 1)] if n else math.nan

        return cls(
            concurrency=concurrency,
            procs=procs,
            requests=n,
            errors=dict(sorted(tally.errors.items())),
            duration_s=duration_s,
            rps=n / duration_s,
            p50_ms=percentile(50),
            p90_ms=percentile(90),
            p99_ms=percentile(99),
            mean_ms=math.fsum(ms) / n if n else math.nan,
            max_ms=ms[-1] if n else math.nan,
        )

    def as_dict(self) -> dict[str, object]:
        """JSON-ready: NaN (no successful request) becomes None."""
        return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in asdict(self).items()}

    def summary(self) -> str:
        errors = f"{sum(self.errors.values())} errors" + (f" {self.errors}" if self.errors else "")
        return (
            f"c={self.concurrency} procs={self.procs}: {self.rps:.1f} req/s, {self.requests} ok, {errors} "
            f"in {self.duration_s:g} s; ms p50 {self.p50_ms:.2f} p90 {self.p90_ms:.2f} "
            f"p99 {self.p99_ms:.2f} mean {self.mean_ms:.2f} max {self.max_ms:.2f}"
        )


def default_procs() -> int:
    """Half the cores: the other half is left to the server under test when it shares the host."""
    return max(1, (os.cpu_count() or 2) // 2)


def run(
    url: str,
    body: bytes,
    content_type: str,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    procs: int | None = None,
    headers: dict[str, str] | None = None,
) -> Result:
    """Load `url` with `concurrency` closed-loop connections: `warmup_s` uncounted, then `duration_s` measured."""
    if concurrency < 1 or duration_s <= 0 or warmup_s < 0:
        raise ValueError("need concurrency >= 1, duration_s > 0, warmup_s >= 0")
    target = Target.parse(url, body, {"Content-Type": content_type, **(headers or {})})
    nprocs = min(concurrency, procs or default_procs())
    shares = [concurrency // nprocs + (i < concurrency % nprocs) for i in range(nprocs)]
    context = multiprocessing.get_context("forkserver") if FORKSERVER else multiprocessing.get_context("spawn")
    pipes: list[Connection] = []
    workers: list[multiprocessing.process.BaseProcess] = []
    try:
        for share in shares:
            ours, theirs = context.Pipe()
            workers.append(context.Process(target=load_worker, args=(target, share, theirs), daemon=True))
            workers[-1].start()
            theirs.close()  # so that our recv() sees EOF if the worker dies
            pipes.append(ours)
        for pipe, worker in zip(pipes, workers, strict=True):
            receive(pipe, worker)  # connected, ready
        start = time.monotonic() + 0.05
        window = Window(start, start + warmup_s, start + warmup_s + duration_s)
        for pipe in pipes:
            pipe.send(window)
        total = Tally()
        for pipe, worker in zip(pipes, workers, strict=True):
            total.add(receive(pipe, worker))
    finally:
        for pipe in pipes:
            pipe.close()  # a worker still waiting for its window sees EOF and exits
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.kill()
    return Result.of(total, concurrency, nprocs, duration_s)


def receive(pipe: Connection, worker: multiprocessing.process.BaseProcess) -> Tally:
    try:
        message: Tally = pipe.recv()
    except EOFError:
        worker.join(timeout=5)
        raise RuntimeError(f"load worker {worker.name} died (exit code {worker.exitcode})") from None
    return message


def load_worker(target: Target, threads: int, pipe: Connection) -> None:
    """One process: connect `threads` connections, say so, wait for the window, drive them, send back the tally."""
    connections = [target.connection() for _ in range(threads)]
    for connection in connections:
        try:
            connection.connect()
        except OSError:
            connection.close()  # the first request reconnects, and counts the error if it fails again
    pipe.send(Tally())  # an empty tally: ready
    window: Window = pipe.recv()
    tallies = [Tally() for _ in connections]
    drivers = [
        threading.Thread(target=drive, args=(connection, target, window, tally))
        for connection, tally in zip(connections, tallies, strict=True)
    ]
    for driver in drivers:
        driver.start()
    for driver in drivers:
        driver.join()
    total = Tally()
    for tally in tallies:
        total.add(tally)
    pipe.send(total)
    pipe.close()


def drive(connection: http.client.HTTPConnection, target: Target, window: Window, tally: Tally) -> None:
    """Send back to back on one connection until the window ends; tally what completes inside the measured part."""
    time.sleep(max(0.0, window.start - time.monotonic()))
    while (sent := time.monotonic()) < window.end:
        outcome = ""
        try:
            connection.request("POST", target.path, target.body, target.headers)
            response = connection.getresponse()
            response.read()  # http.client closes, and the next request reopens, when the server says Connection: close
            if response.status != 200:
                outcome = str(response.status)
        except (OSError, http.client.HTTPException) as error:
            outcome = type(error).__name__
            connection.close()  # the next request reconnects
        done = time.monotonic()
        if window.measure_from <= done < window.end:
            if outcome:
                tally.errors[outcome] += 1
            else:
                tally.latencies.append(done - sent)
    connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--file", type=Path, required=True, help="the request body")
    parser.add_argument("--content-type", default="application/octet-stream")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds sent but not counted")
    parser.add_argument("--procs", type=int, default=None, help=f"worker processes (default {default_procs()})")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    args = parser.parse_args()
    headers = dict(_split_header(h) for h in args.header)
    result = run(
        args.url,
        args.file.read_bytes(),
        args.content_type,
        args.concurrency,
        args.duration,
        args.warmup,
        procs=args.procs,
        headers=headers,
    )
    print(result.summary())
    if args.json:
        args.json.write_text(json.dumps(result.as_dict(), indent=2) + "\n")


def _split_header(line: str) -> tuple[str, str]:
    name, sep, value = line.partition(":")
    if not sep or not name.strip():
        raise SystemExit(f"--header wants 'Name: value', got {line!r}")
    return name.strip(), value.strip()


if __name__ == "__main__":
    main()
