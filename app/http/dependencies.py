"""What routes get from the app: its engine, settings and metrics, typed (Starlette's `app.state` is not), and the
route parameters shared by several routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.config.settings import Settings
from app.engine.facade import Engine
from app.observability.metrics import Metrics


def engine_of(request: Request) -> Engine:
    engine: Engine = request.app.state.engine
    return engine


def settings_of(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def metrics_of(request: Request) -> Metrics:
    metrics: Metrics = request.app.state.metrics
    return metrics


async def served_model_name(request: Request) -> str:
    """The model a route is for (404 if unknown), noted for logs and metrics before any parameter is checked.

    `async` although it never waits: FastAPI runs a plain `def` dependency in its thread pool, a round trip to another
    thread on every request."""
    name = engine_of(request).resolve(request.path_params.get("name"))
    request.state.model = name
    return name


ModelName = Annotated[str, Depends(served_model_name)]
