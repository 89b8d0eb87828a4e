"""The real app in this process: `serve_in_process(engine, settings)` runs `create_app` over real ASGI, with its
lifespan (warm-up, then drain on exit), in the test's event loop."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import httpx
from fastapi import FastAPI

from app.config.settings import Settings
from app.engine.facade import Engine
from app.http.app import create_app

ClientFactory = Callable[..., AbstractAsyncContextManager[httpx.AsyncClient]]


@asynccontextmanager
async def serve_in_process(engine: Engine, settings: Settings | None = None) -> AsyncIterator[httpx.AsyncClient]:
    """The real app over real ASGI, its lifespan run (warm-up, then drain on exit), in this event loop."""
    app: FastAPI = create_app(settings or Settings(drain_timeout_s=5), engine)
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://test", timeout=30) as client,
    ):
        await app.state.warming  # the lifespan returns at once; the tests start once the engine is warm
        yield client
