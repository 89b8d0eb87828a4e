"""`GrpcServer` in-process: health that follows what it is told and turns NOT_SERVING for good at the drain (Watch
streams end then), message sizes bounded as HTTP bodies, a taken port refused with one clear message."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.config.settings import Settings
from app.grpc.ports import PortUnavailable, ensure_free
from app.grpc.server import INFERENCE_SERVICE, GrpcServer
from app.observability.metrics import Metrics
from tests.support.fakes import fake_engine
from tests.support.processes import free_port

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def grpc_server(port: int, **settings: object) -> GrpcServer:
    engine = fake_engine()
    metrics = Metrics(max_batch_size=16, status=engine.status)
    return GrpcServer(Settings(host="127.0.0.1", grpc_port=port, **settings), engine, metrics)  # type: ignore[arg-type]


@asynccontextmanager
async def started(**settings: object) -> AsyncIterator[tuple[GrpcServer, grpc.aio.Channel]]:
    server = grpc_server(free_port(), **settings)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            yield server, channel
    finally:
        await server.stop(5)


async def statuses(channel: grpc.aio.Channel) -> list[int]:
    health = health_pb2_grpc.HealthStub(channel)
    return [
        (await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)).status
        for service in ("", INFERENCE_SERVICE)
    ]


async def test_health_follows_readiness_until_the_drain_and_watch_streams_end_with_it() -> None:
    async with started() as (server, channel):
        assert await statuses(channel) == [NOT_SERVING] * 2  # until told it is ready: warming up
        await server.set_serving(True)
        assert await statuses(channel) == [SERVING] * 2
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert (await watch.read()).status == SERVING
        await server.set_serving(False)
        assert (await watch.read()).status == NOT_SERVING
        await server.set_serving(True)
        assert (await watch.read()).status == SERVING

        server.begin_drain()
        assert (await watch.read()).status == NOT_SERVING
        assert await watch.read() is grpc.aio.EOF  # the stream ends: it would hold the drain open
        assert await watch.code() == grpc.StatusCode.OK
        await server.set_serving(True)  # too late: the drain has begun
        assert await statuses(channel) == [NOT_SERVING] * 2


async def test_a_message_larger_than_the_body_limit_is_refused() -> None:
    async with started(max_body_bytes=4096) as (_, channel):
        check: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary("/grpc.health.v1.Health/Check")
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await check(health_pb2.HealthCheckRequest(service="x" * 5000).SerializeToString(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_taken_port_is_refused_with_one_clear_message() -> None:
    """Even one taken with SO_REUSEPORT: a lone server process never shares its port (gRPC's default would)."""
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(PortUnavailable, match=f"cannot serve gRPC on 127.0.0.1:{port}: Address already in use"):
            ensure_free("127.0.0.1", port)
        server = grpc_server(port)
        with pytest.raises(PortUnavailable, match=f"cannot serve gRPC on 127.0.0.1:{port}"):
            await server.start()
        await server.stop(0)
    ensure_free("127.0.0.1", port)  # free again
