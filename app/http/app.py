"""`create_app(settings, engine)`: a fresh FastAPI app around an engine; no global app, nothing at import time."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware

from app import __version__
from app.config.settings import Settings
from app.engine.facade import Engine
from app.http import api_docs, classify, demo, embed, explain, model_control, models, oip, probes, prometheus
from app.http.auth import ApiKeyMiddleware
from app.http.body_limit import BodyLimitMiddleware
from app.http.error_handlers import install_error_handlers
from app.http.telemetry import TelemetryMiddleware
from app.http.tracing import TracingMiddleware
from app.observability.metrics import Metrics

if TYPE_CHECKING:
    from app.observability.tracing import Tracing  # imports OpenTelemetry: only where tracing is on

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    engine: Engine,
    *,
    metrics_dir: Path | None = None,
    before_serving: Callable[[], None] | None = None,
    tracing: Tracing | None = None,
) -> FastAPI:
    """The HTTP service. Its lifespan starts the engine's warm-up and returns: the probes answer at once, readiness
    says "warming up" until the engine is warm (`app.state.warming`, the warm-up's task, is done then). On shutdown
    it drains the engine. `metrics_dir`: this is one of several workers, whose metrics are combined there (see
    `Metrics`). `before_serving` (blocking, run on a thread) runs once the engine is warm, and the lifespan waits for
    both: no connection is taken before it returns (the workers' start barrier). `tracing`: each request traced
    there (a server span, the engine's stages, the batches' forwards), none without it."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.warming = warming = asyncio.create_task(engine.start(), name="warm-up")
        warming.add_done_callback(_report_failure)
        try:
            if before_serving is not None:
                await warming
                metrics.start()  # a worker's sampled series appear once it is warm
                await asyncio.to_thread(before_serving)
            else:
                metrics.start()
            yield
        finally:
            warming.cancel()  # stopped while warming up: the step running in its thread ends by itself
            await engine.stop(settings.drain_timeout_s)
            metrics.stop()
            log.info("drained: every accepted request answered, the engine stopped")

    app = FastAPI(
        title="vit-serve",
        version=__version__,
        summary="Vision Transformer image classification with dynamic batching.",
        lifespan=lifespan,
        docs_url=None,  # FastAPI's page loads its scripts from a CDN; `api_docs` serves them from the package
        redoc_url=None,  # ReDoc 2 cannot read an OpenAPI 3.1 schema's `$defs`: a page that never renders
    )
    app.state.engine = engine
    app.state.settings = settings
    largest_batch = max(engine.describe(name).batching.max_batch_size for name in engine.names())
    app.state.metrics = metrics = Metrics(
        max_batch_size=largest_batch, status=engine.status, multiprocess_dir=metrics_dir
    )
    engine.observe(metrics)
    # Starlette runs the last one added first: tracing, telemetry, CORS, API keys, body limit, then the routes.
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
    modules = (classify, embed, explain, models, model_control, probes, prometheus, oip, demo, api_docs)
    routes = [route for module in modules for route in module.router.routes]
    app.add_middleware(TelemetryMiddleware, metrics=metrics, routes=routes)  # it sees every answer
    if tracing is not None:
        engine.trace(tracing)
        app.add_middleware(TracingMiddleware, tracing=tracing, routes=routes)  # outermost: its span holds the rest
    install_error_handlers(app)
    for module in modules:
        app.include_router(module.router)
    return app


def _report_failure(warming: asyncio.Task[None]) -> None:
    """A warm-up that failed is logged here (the engine's `failure` says why; the server exits on it)."""
    if not warming.cancelled() and (exc := warming.exception()) is not None:
        log.error("warm-up failed: the service will not become ready", exc_info=exc)
