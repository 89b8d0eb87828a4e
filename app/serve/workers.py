"""`workers` > 1: a supervisor process and that many server processes sharing one listening socket.

The supervisor binds the port, then starts each worker as a fresh interpreter (spawn: CUDA cannot be forked). A worker
loads its own copy of the models and warms them up; once every worker is warm, they all start accepting connections
from the shared socket. So a connection is only ever taken by a worker that is ready, and the first one ready does
not take every connection opened meanwhile (kept-alive connections, from a load balancer say, would stay with it
after the others are up). Each worker is a whole `app.serve.server` process: its own event loop, batchers and decode
threads, and the same graceful drain on SIGTERM.

- Start-up: a worker that exits before it is ready (a model that does not load, say) stops the others, and the
  supervisor exits 1 with the worker's error in the log: the same failure would repeat on every restart.
- A worker that dies afterwards is replaced (waiting `RESTART_BACKOFF_S` times the failures in a row first, at most
  `MAX_RESTART_BACKOFF_S`); the others go on serving meanwhile.
- SIGTERM or SIGINT: every worker gets SIGTERM and drains; the supervisor waits for them (at most `drain_timeout_s`
  and a margin, then SIGKILL) and exits 0 if every worker did, else 1. A second signal is passed on too: each worker
  then ends at once. The port is closed at the first signal, so a new connection is refused rather than queued for
  no worker. A signal from the moment `supervise` is called, before any worker started, is a clean stop (status 0).
- gRPC (`grpc_port`): each worker serves it on the same port (SO_REUSEPORT), from the barrier on; the supervisor
  checks first that the port is free, so that a taken one fails the start once, before any model loads.
- Metrics: prometheus-client's multiprocess mode, in a temporary folder that the supervisor creates before the first
  worker (PROMETHEUS_MULTIPROC_DIR) and removes at the end; a dead worker's live gauges are dropped from it.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Event
from pathlib import Path
from socket import socket
from types import FrameType

import uvicorn

from app.config.settings import Settings
from app.errors import ModelLoadError
from app.grpc.ports import PortUnavailable, ensure_free

log = logging.getLogger(__name__)

POLL_S = 0.2
RESTART_BACKOFF_S = 1.0
MAX_RESTART_BACKOFF_S = 30.0
DRAIN_MARGIN_S = 5.0
EXIT_FAILED = 1
SIGNALS = (signal.SIGINT, signal.SIGTERM)
METRICS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

_spawn = multiprocessing.get_context("spawn")


def run_worker(settings: Settings, sock: socket, metrics_dir: Path, warm: Event, go: Event, ready: Event) -> None:
    """A worker process's entry point: serve on the supervisor's socket. `warm` is set once its models are warm; it
    takes connections once `go` is set (every worker warm, or the supervisor stopping); `ready` is set once it does.

    The worker leaves the terminal's process group, so that Ctrl-C reaches the supervisor alone (which passes on one
    SIGTERM: the worker would otherwise see two signals and skip its drain), and drains by itself if the supervisor
    is gone."""
    from app.observability.logs import configure_logging
    from app.serve.server import serve

    os.setpgrp()
    configure_logging(settings.log_level, settings.log_format)
    parent = os.getppid()
    threading.Thread(target=_drain_when_orphaned, args=(parent,), name="orphan-watch", daemon=True).start()

    def when_all_are_warm() -> None:
        log.info("worker %d warm; waiting for the others before taking connections", os.getpid())
        warm.set()
        while not go.wait(POLL_S) and os.getppid() == parent:  # bounded by the supervisor, or its absence
            pass
        log.info("worker %d taking connections", os.getpid())

    try:
        serve(settings, sockets=[sock], on_started=ready.set, metrics_dir=metrics_dir, before_serving=when_all_are_warm)
    except ModelLoadError as exc:
        log.error("worker %d: %s", os.getpid(), exc)
        raise SystemExit(EXIT_FAILED) from None


def _drain_when_orphaned(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    log.error("worker %d: the supervisor (pid %d) is gone: draining", os.getpid(), parent)
    os.kill(os.getpid(), signal.SIGTERM)


@dataclass
class Worker:
    index: int
    process: SpawnProcess
    warm: Event
    ready: Event
    failures_in_a_row: int = 0
    terminated: bool = False

    @property
    def pid(self) -> int:
        assert self.process.pid is not None
        return self.process.pid

    def terminate(self, *, again: bool = False) -> None:
        """SIGTERM: the worker drains. `again`: a second one, which ends its drain at once."""
        if self.process.is_alive() and (again or not self.terminated):
            os.kill(self.pid, signal.SIGTERM)
        self.terminated = True


@dataclass
class Supervisor:
    settings: Settings
    sock: socket
    metrics_dir: Path
    workers: list[Worker] = field(default_factory=list)
    signals: int = 0
    go: Event = field(default_factory=_spawn.Event)  # set once every first worker is warm: all take connections

    def start_worker(self, index: int, failures_in_a_row: int = 0) -> Worker:
        warm, ready = _spawn.Event(), _spawn.Event()
        process = _spawn.Process(
            target=run_worker,
            args=(self.settings, self.sock, self.metrics_dir, warm, self.go, ready),
            name=f"vit-serve-worker-{index}",
        )
        process.start()
        worker = Worker(index, process, warm, ready, failures_in_a_row)
        log.info(
            "worker %d started (pid %d)", index, worker.pid, extra={"fields": {"worker": index, "pid": worker.pid}}
        )
        return worker

    def on_signal(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        name = signal.Signals(sig).name
        log.info("%s: passing SIGTERM on to %d workers", name, len(self.workers))
        for worker in self.workers:
            worker.terminate(again=self.signals > 1)

    def run(self) -> int:
        """Start the workers, keep them running until a signal, and return the exit status."""
        if self.signals:  # before any worker started
            return self._stop(0)
        self.workers = [self.start_worker(index) for index in range(self.settings.workers)]
        if not self._wait_until_ready():  # a signal during the start is no failure; a worker that failed is
            return self._stop(0 if self.signals else EXIT_FAILED)
        log.info("%d workers ready on %s:%d", len(self.workers), self.settings.host, self.settings.port)
        while not self.signals:
            time.sleep(POLL_S)
            for position, worker in enumerate(self.workers):
                if not worker.process.is_alive() and not self.signals:
                    self.workers[position] = self._replace(worker)
        return self._stop(0)

    def _wait_until_ready(self) -> bool:
        """True once every worker is warm, has been let in (`go`), and is ready; False if a signal came or one exited
        first."""
        for stage in ("warm", "ready"):
            if stage == "ready":
                self.go.set()  # every worker warm: all of them take connections from now on
            while not all(getattr(worker, stage).is_set() for worker in self.workers):
                if self.signals:
                    return False
                for worker in self.workers:
                    if not worker.process.is_alive() and not worker.ready.is_set():
                        log.error(
                            "worker %d exited with status %s before it was ready: stopping",
                            worker.index,
                            worker.process.exitcode,
                        )
                        return False
                time.sleep(POLL_S)
        return True

    def _replace(self, worker: Worker) -> Worker:
        self._forget(worker)
        failures = worker.failures_in_a_row + 1 if not worker.ready.is_set() else 1
        backoff = min(RESTART_BACKOFF_S * failures, MAX_RESTART_BACKOFF_S)
        log.error(
            "worker %d (pid %d) exited with status %s; starting another in %g s",
            worker.index,
            worker.pid,
            worker.process.exitcode,
            backoff,
            extra={"fields": {"worker": worker.index, "pid": worker.pid, "exit_status": worker.process.exitcode}},
        )
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and not self.signals:
            time.sleep(POLL_S)
        if self.signals:  # stopping: no replacement
            return worker
        return self.start_worker(worker.index, failures)

    def _forget(self, worker: Worker) -> None:
        """A dead worker's live gauges leave the metrics; its counters stay in the sums."""
        from prometheus_client.multiprocess import mark_process_dead

        worker.process.join(timeout=POLL_S)
        mark_process_dead(worker.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]

    def _stop(self, status: int) -> int:
        """SIGTERM to every worker (once), wait for the drains (bounded), SIGKILL what is left; the exit status."""
        self.signals = max(self.signals, 1)
        self.go.set()  # none waits at the barrier
        # No worker takes a connection from now on: closed here and in each worker as its drain begins, the port
        # refuses new connections instead of queueing them for nobody (to be reset at the exit).
        self.sock.close()
        for worker in self.workers:
            worker.terminate()
        deadline = time.monotonic() + self.settings.drain_timeout_s + DRAIN_MARGIN_S
        for worker in self.workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.error("worker %d did not exit after its drain: killing it", worker.index)
                worker.process.kill()
                worker.process.join(timeout=DRAIN_MARGIN_S)
                status = EXIT_FAILED
            elif worker.process.exitcode != 0 and worker.ready.is_set():  # one still starting may just end
                status = EXIT_FAILED
            self._forget(worker)
        log.info("all workers stopped; exiting with status %d", status)
        return status


def _bind(settings: Settings) -> socket:
    """The listening socket, bound as uvicorn binds it, without uvicorn's "Uvicorn running on" line: logged now, it
    came minutes before any worker was warm. Connections wait in the backlog until every worker is."""
    uvicorn_log = logging.getLogger("uvicorn.error")
    uvicorn_log.disabled = True
    try:
        sock = uvicorn.Config("app", host=settings.host, port=settings.port).bind_socket()
    finally:
        uvicorn_log.disabled = False
    log.info(
        "listening on %s:%d; connections wait until all %d workers are warm (each logs its warm-up)",
        settings.host,
        settings.port,
        settings.workers,
    )
    return sock


def supervise(settings: Settings) -> int:
    """Serve with `settings.workers` processes on one port until SIGTERM/SIGINT; the exit status."""
    early: list[int] = []  # signals before the supervisor exists: a clean stop, not a death by the signal
    previous = {sig: signal.signal(sig, lambda sig, frame: early.append(sig)) for sig in SIGNALS}
    try:
        if settings.grpc_port:
            try:
                ensure_free(settings.host, settings.grpc_port)
            except PortUnavailable as exc:
                log.error("%s", exc)
                return EXIT_FAILED
        multiprocessing.allow_connection_pickling()  # the socket goes to each worker
        sock = _bind(settings)
        metrics_dir = Path(tempfile.mkdtemp(prefix="vit-serve-metrics-"))
        previous_dir = os.environ.get(METRICS_DIR_VARIABLE)
        os.environ[METRICS_DIR_VARIABLE] = str(metrics_dir)  # inherited by the workers, read as prometheus loads
        supervisor = Supervisor(settings, sock, metrics_dir, signals=len(early))
        for sig in SIGNALS:
            signal.signal(sig, supervisor.on_signal)
        try:
            return supervisor.run()
        finally:
            sock.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)
            # The folder is gone: a process started after this one (a caller's own) must not be pointed at it.
            if previous_dir is None:
                os.environ.pop(METRICS_DIR_VARIABLE, None)
            else:
                os.environ[METRICS_DIR_VARIABLE] = previous_dir
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
