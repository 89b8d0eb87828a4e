"""`create_app(settings, engine)`: a fresh FastAPI app around an engine; no global app, nothing at import time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from app import __version__
from app.config.settings import Settings
from app.engine.facade import Engine
from app.http import classify, demo, embed, explain, model_control, models, oip, probes, prometheus
from app.http.auth import ApiKeyMiddleware
from app.http.body_limit import BodyLimitMiddleware
from app.http.error_handlers import install_error_handlers
from app.http.telemetry import TelemetryMiddleware
from app.observability.metrics import Metrics


def create_app(
    settings: Settings,
    engine: Engine,
    *,
    metrics_dir: Path | None = None,
    before_serving: Callable[[], None] | None = None,
) -> FastAPI:
    """The HTTP service. Its lifespan warms the engine up before serving and drains it on shutdown. `metrics_dir`:
    this is one of several workers, whose metrics are combined there (see `Metrics`). `before_serving` (blocking, run
    on a thread) runs once the engine is warm and before any connection is taken: the workers' start barrier."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        metrics.start()
        if before_serving is not None:
            await asyncio.to_thread(before_serving)
        try:
            yield
        finally:
            await engine.stop(settings.drain_timeout_s)
            metrics.stop()

    app = FastAPI(
        title="vit-serve",
        version=__version__,
        summary="Vision Transformer image classification with dynamic batching.",
        lifespan=lifespan,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.metrics = metrics = Metrics(engine, multiprocess_dir=metrics_dir)
    # Starlette runs the last one added first: telemetry, CORS, API keys, body limit, then the routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=[key.get_secret_value() for key in settings.api_keys])
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type", "X-Request-ID", "Inference-Header-Content-Length"],
            expose_headers=["X-Request-ID", "Server-Timing", "Retry-After", "Inference-Header-Content-Length"],
            max_age=600,
        )
    app.add_middleware(TelemetryMiddleware, metrics=metrics)  # outermost: it sees every answer
    install_error_handlers(app)
    for module in (classify, embed, explain, models, model_control, probes, prometheus, oip, demo):
        app.include_router(module.router)
    return app
