"""The gRPC methods as the interceptors see them: which are probes, and a method handler with each call run inside a
context of the interceptor's (`around`), whichever of the four kinds the method is (unary or streaming, each way), so
that the interceptors see every call, health and reflection included. `around` is entered in the call's own task,
before the handler; what it raises there (an abort) answers the call instead."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

Context = grpc.aio.ServicerContext[Any, Any]
Around = Callable[[Context], AbstractAsyncContextManager[None]]

SERVICE = "/inference.GRPCInferenceService/"
HEALTH = "/grpc.health.v1.Health/"
# Polled by machines, without credentials: open without a key, and logged at DEBUG, as HTTP's /v2/health/* (a model's
# readiness, ModelReady, needs a key as /v2/models/{name}/ready does).
PROBES = frozenset({SERVICE + "ServerLive", SERVICE + "ServerReady"})


def is_probe(method: str) -> bool:
    return method in PROBES or method.startswith(HEALTH)


class AroundCalls(grpc.aio.ServerInterceptor):
    """An interceptor that runs the calls of a served method inside a context of its own (`around`), or leaves the
    method as it is (`around` returns None). A method that is not served (gRPC answers UNIMPLEMENTED) is never seen."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        around = self.around(handler_call_details)
        return handler if around is None else wrap(handler, around)

    def around(self, call: grpc.HandlerCallDetails) -> Around | None:
        raise NotImplementedError


def status_code(context: Context) -> grpc.StatusCode | None:
    """The status the handler set or aborted with, if any."""
    code: grpc.StatusCode | int | None = context.code()
    if code is None or isinstance(code, grpc.StatusCode):
        return code
    return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)


def wrap(handler: grpc.RpcMethodHandler[Any, Any], around: Around) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with every call inside `around(context)`; the same (de)serializers, the same kind."""
    codec = {"request_deserializer": handler.request_deserializer, "response_serializer": handler.response_serializer}
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(_unary(handler.unary_unary, around), **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(_streaming(handler.unary_stream, around), **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(_unary(handler.stream_unary, around), **codec)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(_streaming(handler.stream_stream, around), **codec)
    raise ValueError("a method handler without a behaviour")


def _unary(behavior: Callable[..., Any], around: Around) -> Callable[[Any, Context], Any]:
    async def call(request: Any, context: Context) -> Any:
        async with around(context):
            result = behavior(request, context)
            return await result if inspect.isawaitable(result) else result

    return call


def _streaming(behavior: Callable[..., Any], around: Around) -> Callable[[Any, Context], Any]:
    """A streamed answer, whether the behaviour yields it (an async generator) or writes it (`context.write`)."""

    async def call(request: Any, context: Context) -> None:
        async with around(context):
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                await _write_all(result, context)
            elif inspect.isawaitable(result):
                await result
            else:
                for response in result:
                    await context.write(response)

    return call


async def _write_all(responses: AsyncIterator[Any], context: Context) -> None:
    async for response in responses:
        await context.write(response)
