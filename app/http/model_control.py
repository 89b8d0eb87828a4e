"""Loading, reloading and unloading the repository's models while serving (`model_control`, behind the API key):
`POST /v1/models/{name}/load` and `/unload`, and the same through OIP's model repository extension (Triton's
`/v2/repository/...`). A load of a served model swaps it: the old one answers every request it accepted."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.config.settings import Settings
from app.engine.descriptions import ModelInfo
from app.engine.facade import Engine
from app.errors import BadRequest, Forbidden, NotReady
from app.http.dependencies import engine_of, settings_of
from app.http.responses import JSONResponse
from app.http.schemas import ERROR_RESPONSES
from app.protocols.json_bounds import parse_json

router = APIRouter(tags=["model control"])

_ERRORS: dict[int | str, dict[str, Any]] = {status: ERROR_RESPONSES[status] for status in (400, 404, 503)}
_CONTROL_ERRORS: dict[int | str, dict[str, Any]] = {
    **_ERRORS,
    403: {"description": "model_control is off"},
    409: {"description": "The default model cannot be unloaded"},
}


@router.post(
    "/v1/models/{name}/load",
    response_model=ModelInfo,
    responses=_CONTROL_ERRORS,
    summary="Load a model from the repository, or reload a served one (swapped in once warm)",
)
async def load(request: Request, name: str) -> Response:
    engine, settings = _controlled(request)
    request.state.model = name
    model = await engine.load_model(name, drain_timeout_s=settings.drain_timeout_s)
    return JSONResponse(model.as_json())


@router.post(
    "/v1/models/{name}/unload", responses=_CONTROL_ERRORS, summary="Stop serving a model (what it accepted is answered)"
)
async def unload(request: Request, name: str) -> Response:
    engine, settings = _controlled(request)
    request.state.model = name
    await engine.unload_model(name, drain_timeout_s=settings.drain_timeout_s)
    return JSONResponse({"name": name, "unloaded": True})


@router.post("/v2/repository/index", responses=_CONTROL_ERRORS, summary="OIP repository extension: every model")
async def repository_index(request: Request) -> Response:
    """Each model of the repository with its state: READY (served) or UNAVAILABLE; `{"ready": true}` lists only the
    served ones."""
    engine, _ = _controlled(request)
    ready_only = bool((await _json_object(request)).get("ready", False))
    index = []
    for model in engine.repository_index():
        if model.ready:
            index.append({"name": model.name, "version": "1", "state": "READY", "reason": ""})
        elif not ready_only:
            reason = "stopping" if model.served else "unloaded"
            index.append({"name": model.name, "state": "UNAVAILABLE", "reason": reason})
    return JSONResponse(index)


@router.post("/v2/repository/models/{name}/load", responses=_CONTROL_ERRORS, summary="OIP repository extension: load")
async def repository_load(request: Request, name: str) -> Response:
    engine, settings = _controlled(request)
    request.state.model = name
    if (await _json_object(request)).get("parameters"):
        raise BadRequest("load parameters (a config or files) are not supported; edit model.toml in the repository")
    await engine.load_model(name, drain_timeout_s=settings.drain_timeout_s)
    return Response(status_code=200)


@router.post(
    "/v2/repository/models/{name}/unload", responses=_CONTROL_ERRORS, summary="OIP repository extension: unload"
)
async def repository_unload(request: Request, name: str) -> Response:
    engine, settings = _controlled(request)
    request.state.model = name
    await _json_object(request)
    await engine.unload_model(name, drain_timeout_s=settings.drain_timeout_s)
    return Response(status_code=200)


def _controlled(request: Request) -> tuple[Engine, Settings]:
    settings = settings_of(request)
    engine = engine_of(request)
    if not settings.model_control:
        raise Forbidden(
            "model control is off: start the server with --model-control (and an API key) to load and unload models",
            code="model_control_off",
        )
    if engine.repository is None:
        raise NotReady("this engine cannot load models while serving")
    return engine, settings


async def _json_object(request: Request) -> dict[str, Any]:
    """The optional JSON object body of a repository call."""
    body = await request.body()
    if not body.strip():
        return {}
    parsed = parse_json(body)
    if not isinstance(parsed, dict):
        raise BadRequest("the body must be a JSON object", code="invalid_body")
    return parsed
