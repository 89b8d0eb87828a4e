"""The gRPC server: `inference.GRPCInferenceService`, the standard health service (`grpc.health.v1.Health`) and server
reflection, on `settings.grpc_port`, on the event loop it is started on (the HTTP server's: one engine for both).

Health says SERVING only while the engine is ready (`set_serving`, kept in step by the caller), and NOT_SERVING for
good from `begin_drain` on; `stop` then refuses new calls and answers those in flight (bounded) before returning.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from app.config.settings import Settings
from app.engine.facade import Engine
from app.grpc.interceptors import interceptors
from app.grpc.ports import PortUnavailable, address, unavailable
from app.grpc.proto import inference_pb2, inference_pb2_grpc
from app.grpc.servicer import InferenceServicer
from app.observability.metrics import Metrics

if TYPE_CHECKING:
    from app.observability.tracing import Tracing

log = logging.getLogger(__name__)

INFERENCE_SERVICE = inference_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
HEALTH_CHECKED = ("", INFERENCE_SERVICE)  # the whole server's status, and the inference service's
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class DrainingHealth(health.aio.HealthServicer):  # type: ignore[misc]
    """grpcio-health-checking's health service, whose Watch streams end once the drain begins, after they have sent
    NOT_SERVING: an open stream (a client's own health checking keeps one to each server) would otherwise hold the
    server's drain to its bound."""

    def __init__(self) -> None:
        super().__init__()
        self._changed = asyncio.Event()  # set, then replaced, at each change of any status

    async def set(self, service: str, status: health_pb2.HealthCheckResponse.ServingStatus) -> None:
        await super().set(service, status)
        self._notify()

    async def enter_graceful_shutdown(self) -> None:
        await super().enter_graceful_shutdown()
        self._notify()

    async def Watch(
        self,
        request: health_pb2.HealthCheckRequest,
        context: grpc.aio.ServicerContext[health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse],
    ) -> None:
        """The library's Watch (the status at once, then each change), ending after NOT_SERVING once draining."""
        sent = None
        while True:
            changed = self._changed  # taken before reading: a change from here on sets it
            # The library's own record (what its Check reads), and its flag for the drain.
            status = self._server_status.get(request.service, health_pb2.HealthCheckResponse.SERVICE_UNKNOWN)
            if status != sent:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                sent = status
            if self._gracefully_shutting_down:
                # The flag is up before the record turns NOT_SERVING, and a write in flight when the drain began has
                # read the record before either: a stream that said SERVING says NOT_SERVING before it ends.
                if sent == SERVING:
                    await context.write(health_pb2.HealthCheckResponse(status=NOT_SERVING))
                return
            await changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()


class GrpcServer:
    """The gRPC side of one server process. `start()` on the running event loop; then `set_serving` as readiness
    changes; `begin_drain()` (synchronous) at the signal; `stop(grace_s)` once the drain runs."""

    def __init__(self, settings: Settings, engine: Engine, metrics: Metrics, tracing: Tracing | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.metrics = metrics
        self.tracing = tracing  # a server span per call, as over HTTP, when tracing is on
        self.address = address(settings.host, settings.grpc_port)
        self._health = DrainingHealth()
        self._serving: bool | None = None
        self._server: grpc.aio.Server | None = None
        self._draining: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Bind the port and take calls, health NOT_SERVING until `set_serving(True)`. `PortUnavailable` if the port
        cannot be bound."""
        server = grpc.aio.server(
            interceptors=interceptors(self.settings, self.metrics, self.tracing),
            options=[
                ("grpc.max_receive_message_length", self.settings.max_body_bytes),  # as the HTTP body limit
                ("grpc.max_send_message_length", self.settings.max_body_bytes),
                # Shared only by the workers of one server (each binds it): a lone process never shares its port
                # with another one, silently, as gRPC's default (on) would let it.
                ("grpc.so_reuseport", int(self.settings.workers > 1)),
            ],
        )
        inference_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(  # type: ignore[no-untyped-call]
            InferenceServicer(self.engine, self.settings), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        reflection.enable_server_reflection((INFERENCE_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)
        await self.set_serving(False)
        try:
            server.add_insecure_port(self.address)
        except RuntimeError:  # gRPC says only "Failed to bind": the reason is in its own log line
            raise PortUnavailable(
                unavailable(self.settings.host, self.settings.grpc_port, "the address cannot be bound")
            ) from None
        await server.start()
        self._server = server
        log.info(
            "gRPC (inference.GRPCInferenceService, grpc.health.v1, reflection) on %s",
            self.address,
            extra={"fields": {"grpc_port": self.settings.grpc_port}},
        )

    async def set_serving(self, serving: bool) -> None:
        """Health SERVING or NOT_SERVING (ignored once the drain has begun)."""
        if serving == self._serving:
            return
        self._serving = serving
        for service in HEALTH_CHECKED:
            await self._health.set(service, SERVING if serving else NOT_SERVING)

    def begin_drain(self) -> None:
        """Health NOT_SERVING from now on, for good. Call on the event loop (from a signal handler, through
        `loop.call_soon_threadsafe`)."""
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(
                self._health.enter_graceful_shutdown(), name="grpc-health-drain"
            )

    async def stop(self, grace_s: float) -> None:
        """`begin_drain`, then no new calls; the calls in flight are answered, for up to `grace_s` (then cancelled)."""
        self.begin_drain()
        assert self._draining is not None
        await self._draining
        if self._server is not None:
            await self._server.stop(grace_s)
            log.info("gRPC server stopped")
