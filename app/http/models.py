"""`GET /v1/models` and `GET /v1/models/{name}`: what is served, how, and whether it is ready."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.engine.descriptions import ModelInfo
from app.http.dependencies import ModelName, engine_of
from app.http.responses import JSONResponse
from app.http.schemas import ERROR_RESPONSES, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, summary="List the served models")
async def list_models(request: Request) -> Response:
    engine = engine_of(request)
    models = [engine.describe(name).as_json() for name in engine.names()]
    return JSONResponse({"default": engine.default_model, "models": models})


@router.get(
    "/v1/models/{name}",
    response_model=ModelInfo,
    responses={404: ERROR_RESPONSES[404]},
    summary="Describe a model",
)
async def get_model(request: Request, name: str, model: ModelName) -> Response:
    engine = engine_of(request)
    return JSONResponse(engine.describe(model).as_json())
