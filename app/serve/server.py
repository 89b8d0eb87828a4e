"""The HTTP server process: uvicorn around the app, with a shutdown that is graceful and bounded.

First SIGTERM (or SIGINT): readiness turns 503 and new requests are refused with 503 at once, the listening socket
closes, every request already accepted is answered, the batchers stop, and the process exits 0. A second signal, or a
drain still running after `drain_timeout_s`, ends the process at once with status 1 (uvicorn alone would wait for a
stuck client for ever, or exit by re-raising the signal: status -15 even after a clean drain).

With `grpc_port`, the gRPC server runs on the same event loop, on the same engine: started once the HTTP side is (after
the workers' start barrier), its health following readiness at each tick; at the first signal its health turns
NOT_SERVING, and its drain (new calls refused, calls in flight answered) runs beside the HTTP one and ends, as that
does, before the engine stops. A gRPC port that cannot be bound ends the start with one line and status 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Generator
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

import uvicorn

from app.config.settings import Settings
from app.engine.facade import Engine
from app.errors import ModelLoadError
from app.grpc.ports import PortUnavailable, ensure_free
from app.serve.connections import ConnectionLimits, protocol_class

if TYPE_CHECKING:
    from app.grpc.server import GrpcServer
    from app.observability.metrics import Metrics
    from app.observability.tracing import Tracing

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_FORCED = 1
EXIT_FAILED = 1  # the start failed (the gRPC port taken)
EXIT_GRACE_S = 1.0  # after the drain, for idle threads to end by themselves


class Server(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        *,
        engine: Engine,
        drain_timeout_s: float,
        on_started: Callable[[], None] | None = None,
        grpc: GrpcServer | None = None,
    ) -> None:
        super().__init__(config)
        self.engine = engine
        self.drain_timeout_s = drain_timeout_s
        self.on_started = on_started
        self.grpc = grpc
        self.grpc_failed = False  # its port could not be bound: the process exits 1 once the HTTP side is down
        self._loop: asyncio.AbstractEventLoop | None = None
        self._grpc_drain: asyncio.Task[None] | None = None
        self._watchdog: threading.Timer | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's start-up (the lifespan starts the warm-up, then the sockets open), then the gRPC server, then
        `on_started`."""
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if not self.started:
            return
        if self.grpc is not None and not self.should_exit:
            try:
                await self.grpc.start()
            except PortUnavailable as exc:
                log.error("%s", exc)
                self.grpc_failed = self.should_exit = True
                return
        if self.on_started is not None:
            self.on_started()

    async def on_tick(self, counter: int) -> bool:
        """uvicorn's tick (ten a second), which also keeps gRPC health in step with readiness, and ends the server
        when the warm-up failed: it would never be ready, and a process that exits is restarted where one that stays
        up unready is not."""
        if self.grpc is not None:
            await self.grpc.set_serving(self.engine.ready)
        if self.engine.failure is not None and not self.should_exit:
            log.error("exiting: %s", self.engine.failure)
            self.should_exit = True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown (no new connections, the requests in flight answered, then the lifespan stops the
        engine), with the gRPC server's drain beginning at once beside the HTTP one (`_wait_tasks_to_complete`)."""
        if self.grpc is not None:
            self._grpc_drain = asyncio.create_task(self.grpc.stop(self.drain_timeout_s), name="grpc-drain")
        await super().shutdown(sockets)

    async def _wait_tasks_to_complete(self) -> None:
        """uvicorn's wait for the HTTP requests in flight, and the gRPC drain's: both end before the lifespan's
        shutdown stops the engine. (The watchdog bounds the whole drain.)"""
        if self._grpc_drain is None:
            await super()._wait_tasks_to_complete()
        else:
            await asyncio.gather(super()._wait_tasks_to_complete(), self._grpc_drain)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """uvicorn's hook for signal handling, replaced: ours drains, bounds the drain, and does not re-raise."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        original = {sig: signal.signal(sig, self.handle_exit) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)
            if self._watchdog is not None:
                self._watchdog.cancel()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        name = signal.Signals(sig).name
        if self.should_exit:
            _exit_now(f"second {name} during the drain: exiting now, requests still in flight are dropped")
        log.info(
            "%s: draining (up to %g s): not ready, refusing new requests, finishing accepted ones",
            name,
            self.drain_timeout_s,
            extra={"fields": {"signal": name, "drain_timeout_s": self.drain_timeout_s}},
        )
        self.engine.begin_shutdown()
        if self.grpc is not None and self._loop is not None:
            self._loop.call_soon_threadsafe(self.grpc.begin_drain)  # health NOT_SERVING now, not at the next tick
        self.should_exit = True
        self._watchdog = threading.Timer(
            self.drain_timeout_s,
            _exit_now,
            args=(f"drain did not finish within drain_timeout_s={self.drain_timeout_s:g}: exiting now",),
        )
        self._watchdog.daemon = True
        self._watchdog.start()


def serve(
    settings: Settings,
    *,
    sockets: list[socket.socket] | None = None,
    on_started: Callable[[], None] | None = None,
    metrics_dir: Path | None = None,
    before_serving: Callable[[], None] | None = None,
) -> None:
    """Load the models and serve them until SIGTERM/SIGINT, then drain: one server process (or one of `workers`,
    on `sockets` bound by the supervisor, with its metrics in the shared `metrics_dir`, taking connections only once
    `before_serving` returns). Raises `ModelLoadError`; exits 1 if the gRPC port cannot be bound."""
    from app.http.app import create_app
    from app.runtime.device import set_torch_threads
    from app.serve.tracing import start_tracing

    set_torch_threads(settings.resolved_torch_threads())  # the whole process's: its one engine's forwards
    tracing = start_tracing(settings)  # None unless traced (settings.tracing); this process's own provider
    engine = Engine.load(settings)
    if settings.grpc_port and sockets is None:  # a worker's is checked once, by the supervisor, before any starts
        _ensure_grpc_port_free(settings)
    app = create_app(settings, engine, metrics_dir=metrics_dir, before_serving=before_serving, tracing=tracing)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # configured by the caller: one format for every logger
        access_log=False,  # the telemetry middleware writes one richer line per request
        timeout_graceful_shutdown=None,  # the server's own watchdog bounds the whole drain
        server_header=False,
        http=protocol_class(ConnectionLimits.from_settings(settings)),  # timeouts, header limits, connection cap
    )
    server = Server(
        config,
        engine=engine,
        drain_timeout_s=settings.drain_timeout_s,
        on_started=on_started,
        grpc=_grpc_server(settings, engine, app.state.metrics, tracing),
    )
    server.run(sockets)
    if tracing is not None:
        tracing.shutdown()  # the spans still queued, exported (bounded)
    if engine.failure is not None:
        raise ModelLoadError(engine.failure)
    if server.grpc_failed:
        raise SystemExit(EXIT_FAILED)
    _exit_without_abandoned_work()


def _grpc_server(settings: Settings, engine: Engine, metrics: Metrics, tracing: Tracing | None) -> GrpcServer | None:
    """The gRPC side, when `grpc_port` is set; grpcio and the generated modules are imported only then."""
    if not settings.grpc_port:
        return None
    from app.grpc.server import GrpcServer

    return GrpcServer(settings, engine, metrics, tracing)


def _ensure_grpc_port_free(settings: Settings) -> None:
    """Exit 1 with one line now, before the warm-up and the HTTP port, if the gRPC port is taken (a model that does
    not load is told first)."""
    try:
        ensure_free(settings.host, settings.grpc_port)
    except PortUnavailable as exc:
        log.error("%s", exc)
        raise SystemExit(EXIT_FAILED) from None


def _exit_without_abandoned_work() -> None:
    """Once drained, exit now. A thread still busy then holds work that nobody waits for (a CPU forward of a batch
    whose requests all timed out, a decode past its deadline), and the interpreter would join it before exiting: tens
    of seconds, with nothing logged. Idle pool threads are given a moment to end by themselves."""
    others = [t for t in threading.enumerate() if t is not threading.current_thread() and not t.daemon]
    deadline = time.monotonic() + EXIT_GRACE_S
    for thread in others:
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    busy = [thread.name for thread in others if thread.is_alive()]
    if busy:
        log.info("exiting now, dropping the work still running in %s: no request waits for it", ", ".join(busy))
        _flush_logs()
        os._exit(0)


def _exit_now(reason: str) -> None:
    log.error(reason)
    _flush_logs()
    os._exit(EXIT_FORCED)


def _flush_logs() -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
