"""Route parameters shared by several routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.engine.facade import Engine


async def served_model_name(request: Request) -> str:
    """The model a route is for (404 if unknown), noted for logs and metrics before any parameter is checked.

    `async` although it never waits: FastAPI runs a plain `def` dependency in its thread pool, a round trip to another
    thread on every request."""
    engine: Engine = request.app.state.engine
    name = engine.resolve(request.path_params.get("name"))
    request.state.model = name
    return name


ModelName = Annotated[str, Depends(served_model_name)]
