"""`inference.GRPCInferenceService`: the Open Inference Protocol's gRPC calls over the engine that HTTP serves, with
the same models (`m` takes BYTES IMAGE, `m_pixels` FP32 PIXELS), batchers and limits, so a gRPC request and an HTTP
request can share a batch. The protocol's work is `app.protocols.oip`'s; the messages are `app.grpc.messages`'.

Every domain error is answered with its status from `app.grpc.status` (one place: `_answers`); anything else is
INTERNAL with a generic message, logged with its traceback. Without `model_control` the repository calls answer
UNIMPLEMENTED, as gRPC defines it: "not supported/enabled in this service" (the message says how to enable them)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc

from app.config.settings import Settings
from app.engine.facade import Engine
from app.errors import BadRequest, InferenceFailed, NotReady, ServeError
from app.grpc.messages import (
    infer_request,
    infer_response,
    model_config,
    model_metadata,
    payload_bytes,
    server_metadata,
)
from app.grpc.methods import Context
from app.grpc.proto import inference_pb2 as pb
from app.grpc.proto import inference_pb2_grpc
from app.grpc.status import ERROR_CODE, code_of, details_of, error_metadata
from app.grpc.telemetry import this_call
from app.observability.logs import timing_fields
from app.protocols.off_loop import parse_off_loop
from app.protocols.oip.inference import run
from app.protocols.oip.models import VERSION, OipModel, resolve
from app.protocols.oip.server import server_metadata as describe_server

log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
Handler = Callable[["InferenceServicer", Request, Context], Awaitable[Response]]


def _answers(method: Handler[Request, Response]) -> Callable[..., Coroutine[Any, Any, Response]]:
    """The call's answer, or its error's status: a domain error's from the table, anything else INTERNAL."""

    @functools.wraps(method)
    async def answer(self: InferenceServicer, request: Request, context: Context) -> Response:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except ServeError as error:
            this_call().error = error
            if isinstance(error, InferenceFailed):
                log.error("%s: %s", method.__name__, error.message, exc_info=error.__cause__)
            await context.abort(code_of(error), details_of(error), error_metadata(error))
        except Exception:
            log.exception("unhandled error in gRPC %s", method.__name__)
            internal = ServeError("internal server error")
            this_call().error = internal
            await context.abort(code_of(internal), internal.message, error_metadata(internal))

    return answer


class InferenceServicer(inference_pb2_grpc.GRPCInferenceServiceServicer):
    def __init__(self, engine: Engine, settings: Settings) -> None:
        self.engine = engine
        self.settings = settings

    @_answers
    async def ServerLive(self, request: pb.ServerLiveRequest, context: Context) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @_answers
    async def ServerReady(self, request: pb.ServerReadyRequest, context: Context) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.engine.ready)

    @_answers
    async def ModelReady(self, request: pb.ModelReadyRequest, context: Context) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self._model(request.name, request.version).info.ready)

    @_answers
    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: Context) -> pb.ServerMetadataResponse:
        return server_metadata(describe_server(model_control=self.settings.model_control))

    @_answers
    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Context) -> pb.ModelMetadataResponse:
        return model_metadata(self._model(request.name, request.version))

    @_answers
    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Context) -> pb.ModelConfigResponse:
        model = self._model(request.name, request.version)
        return model_config(model, max_request_batch=self.engine.limits.max_images_per_request)

    @_answers
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Context) -> pb.ModelInferResponse:
        model = self._model(request.model_name, request.model_version)
        max_images = self.engine.limits.max_images_per_request
        # tensor data grows with the request: a large one is read off the loop, as HTTP parses a large body
        parsed = await parse_off_loop(payload_bytes(request), infer_request, request, model, max_images=max_images)
        inference, outputs = await run(self.engine, model, parsed)
        this_call().log_fields = {"images": len(inference.outputs), **timing_fields(inference.timings)}
        return infer_response(parsed, model, outputs)

    @_answers
    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: Context) -> pb.RepositoryIndexResponse:
        """Each model of the repository with its state: READY (served) or UNAVAILABLE; `ready` lists only the served
        ones (as REST's /v2/repository/index)."""
        engine = await self._controlled(context)
        index = pb.RepositoryIndexResponse()
        for model in engine.repository_index():
            if model.ready:
                index.models.add(name=model.name, version=VERSION, state="READY")
            elif not request.ready:
                index.models.add(
                    name=model.name, state="UNAVAILABLE", reason="stopping" if model.served else "unloaded"
                )
        return index

    @_answers
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        engine = await self._controlled(context)
        this_call().model = request.model_name
        if request.parameters:
            raise BadRequest("load parameters (a config or files) are not supported; edit model.toml in the repository")
        await engine.load_model(request.model_name, drain_timeout_s=self.settings.drain_timeout_s)
        return pb.RepositoryModelLoadResponse()

    @_answers
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        engine = await self._controlled(context)
        this_call().model = request.model_name
        await engine.unload_model(request.model_name, drain_timeout_s=self.settings.drain_timeout_s)
        return pb.RepositoryModelUnloadResponse()

    def _model(self, name: str, version: str) -> OipModel:
        """The model a call names (an empty version: the only one), noted for its access line and metrics."""
        model = resolve(self.engine, name, version or None)
        this_call().model = model.info.name
        return model

    async def _controlled(self, context: Context) -> Engine:
        if not self.settings.model_control:
            await context.abort(
                grpc.StatusCode.UNIMPLEMENTED,
                "model control is off: start the server with --model-control (and an API key) to load and unload "
                "models",
                ((ERROR_CODE, "model_control_off"),),
            )
        if self.engine.repository is None:
            raise NotReady("this engine cannot load models while serving")
        return self.engine
