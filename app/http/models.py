"""`GET /v1/models` and `GET /v1/models/{name}`: what is served, how, and whether it is ready."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.engine.facade import Engine
from app.engine.served_model import ServedModel
from app.http.dependencies import ModelName
from app.http.responses import JSONResponse
from app.http.schemas import ERROR_RESPONSES, ModelInfo, ModelList

router = APIRouter(tags=["models"])


@router.get("/v1/models", response_model=ModelList, summary="List the served models")
async def list_models(request: Request) -> Response:
    engine: Engine = request.app.state.engine
    models = [_info(engine, m.name) for m in engine.models]
    return JSONResponse({"default": engine.default_model, "models": models})


@router.get(
    "/v1/models/{name}",
    response_model=ModelInfo,
    responses={404: ERROR_RESPONSES[404]},
    summary="Describe a model",
)
async def get_model(request: Request, name: str, model: ModelName) -> Response:
    return JSONResponse(_info(request.app.state.engine, model))


def _info(engine: Engine, name: str) -> dict[str, Any]:
    return model_info(engine, engine.model(name))


def model_info(engine: Engine, served: ServedModel) -> dict[str, Any]:
    """A model's description, with the deadline its requests get (which may follow its measured speed)."""
    return dataclasses.asdict(served.info()) | {"request_timeout_s": engine.request_timeout_s(served)}
