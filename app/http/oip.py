"""The Open Inference Protocol (KServe v2) routes, on the same port and through the same batcher as `/v1`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from app.errors import BadRequest
from app.http.dependencies import engine_of, settings_of
from app.http.disconnect import until_disconnected
from app.http.responses import JSONResponse
from app.http.schemas import ERROR_RESPONSES
from app.http.timing import server_timing
from app.observability.logs import timing_fields
from app.protocols.off_loop import parse_off_loop
from app.protocols.oip.inference import run
from app.protocols.oip.models import OipModel, resolve
from app.protocols.oip.rest import InferRequestBody, encode_response, parse_request
from app.protocols.oip.server import server_metadata as describe_server

router = APIRouter(tags=["open inference protocol (v2)"])

HEADER_LENGTH = "inference-header-content-length"


async def oip_model(request: Request) -> OipModel:
    """`{name}` (and `{version}`) of the path -> the model; 404 if unknown, noted for logs and metrics. `async`, as
    every handler here: FastAPI would run a plain `def` in its thread pool, a thread round trip a request."""
    params = request.path_params
    model = resolve(engine_of(request), params["name"], params.get("version"))
    request.state.model = model.info.name
    return model


Model = Annotated[OipModel, Depends(oip_model)]
MODEL_PATHS = ("/v2/models/{name}", "/v2/models/{name}/versions/{version}")
UNKNOWN_MODEL: dict[int | str, dict[str, Any]] = {404: ERROR_RESPONSES[404]}
READY_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": 'Not ready: {"ready": false}'},
    **UNKNOWN_MODEL,
}


@router.get("/v2", summary="Server metadata")
async def server_metadata(request: Request) -> Response:
    return JSONResponse(describe_server(model_control=settings_of(request).model_control))


@router.get("/v2/health/live", summary="Server live")
async def server_live() -> Response:
    return JSONResponse({"live": True})


@router.get(
    "/v2/health/ready", summary="Server ready (200) or not (400, as the protocol says)", responses=READY_RESPONSES
)
async def server_ready(request: Request) -> Response:
    engine = engine_of(request)
    return _readiness(engine.ready)


async def model_metadata(model: Model) -> Response:
    return JSONResponse(model.metadata())


async def model_ready(model: Model) -> Response:
    return _readiness(model.info.ready)


async def model_config(request: Request, model: Model) -> Response:
    engine = engine_of(request)
    return JSONResponse(model.config(max_request_batch=engine.limits.max_images_per_request))


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its `$defs` written in place of each reference: pydantic's `#/$defs/...` would point at the root
    of the OpenAPI document, where nothing by that name is (the request models are not recursive)."""
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            reference = node.get("$ref")
            if isinstance(reference, str) and reference.startswith("#/$defs/"):
                return resolve(definitions[reference.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(item) for item in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


INFER_DOC: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": (
            "An OIP inference request: JSON, or JSON followed by binary tensor data "
            "(Inference-Header-Content-Length gives the JSON's length; 0 means the whole body is the one input)."
        ),
        "content": {
            "application/json": {"schema": _inlined(InferRequestBody.model_json_schema())},
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def infer(request: Request, model: Model) -> Response:
    engine = engine_of(request)
    body = await request.body()
    max_images = engine.limits.max_images_per_request
    parsed = await parse_off_loop(len(body), parse_request, body, _header_length(request), model, max_images=max_images)
    inference, outputs = await until_disconnected(request, run(engine, model, parsed))
    response = encode_response(parsed, model, outputs)
    request.state.log_fields = {"images": len(inference.outputs), **timing_fields(inference.timings)}
    headers = {"Server-Timing": server_timing(inference.timings)}
    if not response.is_binary:
        return Response(response.header, media_type="application/json", headers=headers)
    headers["Inference-Header-Content-Length"] = str(len(response.header))
    body = b"".join([response.header, *response.binary])
    return Response(body, media_type="application/octet-stream", headers=headers)


def _path_parameters(path: str) -> dict[str, Any]:
    """`name` (and `version`) are read by the `oip_model` dependency, so FastAPI cannot see them: declare them."""
    names = [n for n in ("name", "version") if "{" + n + "}" in path]
    return {
        "parameters": [
            {"name": n, "in": "path", "required": True, "schema": {"type": "string"}, "description": f"model {n}"}
            for n in names
        ]
    }


# (suffix, endpoint, method, summary, documented error answers, extra OpenAPI): each under both MODEL_PATHS.
MODEL_ROUTES: list[tuple[str, Callable[..., Any], str, str, dict[int | str, dict[str, Any]], dict[str, Any]]] = [
    ("", model_metadata, "GET", "Model metadata", UNKNOWN_MODEL, {}),
    ("/ready", model_ready, "GET", "Model ready (200) or not (400)", READY_RESPONSES, {}),
    ("/config", model_config, "GET", "Model configuration (Triton's extension)", UNKNOWN_MODEL, {}),
    ("/infer", infer, "POST", "Inference", ERROR_RESPONSES, INFER_DOC),
]
for path in MODEL_PATHS:
    for suffix, endpoint, method, summary, responses, extra in MODEL_ROUTES:
        router.add_api_route(
            path + suffix,
            endpoint,
            methods=[method],
            summary=summary,
            responses=responses,
            openapi_extra=extra | _path_parameters(path),
        )


def _readiness(ready: bool) -> Response:
    return JSONResponse({"ready": ready}, status_code=200 if ready else 400)


def _header_length(request: Request) -> int | None:
    value = request.headers.get(HEADER_LENGTH)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length must be an integer, not {value[:20]!r}") from None
