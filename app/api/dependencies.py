"""Route parameters shared by several routers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request


def served_model_name(request: Request) -> str:
    """The model a route is for (404 if unknown), noted for logs and metrics before any parameter is checked."""
    name: str = request.app.state.engine.model(request.path_params.get("name")).name
    request.state.model = name
    return name


ModelName = Annotated[str, Depends(served_model_name)]
