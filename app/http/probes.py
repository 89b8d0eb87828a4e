"""Kubernetes probes. Live: the process and its event loop answer. Ready: every model loaded, warmed, its batcher
alive, some decode thread not held by a decode past its deadline, and the service not shutting down. Live is not
ready (infinity #609: /health said 200 while all hung)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.http.dependencies import engine_of
from app.http.responses import JSONResponse
from app.http.schemas import Liveness, Readiness

router = APIRouter(tags=["probes"])


@router.get("/healthz", response_model=Liveness, summary="Liveness")
async def healthz() -> Response:
    return JSONResponse({"status": "alive"})


@router.get("/readyz", response_model=Readiness, responses={503: {"description": "Not ready"}}, summary="Readiness")
async def readyz(request: Request) -> Response:
    engine = engine_of(request)
    models = {name: engine.status(name).ready for name in engine.names()}
    reason = engine.not_ready_reason()
    if reason is None:
        return JSONResponse({"ready": True, "models": models})
    body = {"error": f"not ready: {reason}", "code": "not_ready", "ready": False, "reason": reason, "models": models}
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})
