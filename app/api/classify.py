"""`POST /v1/classify` and `POST /v1/models/{name}/classify`."""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from app.api.bodies import read_images
from app.api.dependencies import ModelName
from app.api.disconnect import until_disconnected
from app.api.responses import JSONResponse
from app.api.schemas import ERROR_RESPONSES, IMAGE_BODY_DOC, ClassifyResponse
from app.api.timing import server_timing, timing_fields
from app.engine import DEFAULT_TOP_K, Classification, Engine
from app.errors import InvalidParameter

router = APIRouter(tags=["classify"])
T = TypeVar("T")

TopK = Annotated[int | None, Query(ge=1, description=f"Classes per image, best first (default {DEFAULT_TOP_K}).")]
Logits = Annotated[bool | None, Query(description="Include the raw logits (default true).")]

_ROUTE: dict[str, Any] = {
    "response_model": ClassifyResponse,
    "responses": ERROR_RESPONSES,
    "openapi_extra": IMAGE_BODY_DOC,
}


@router.post("/v1/classify", summary="Classify images with the default model", **_ROUTE)
async def classify_default(request: Request, model: ModelName, top_k: TopK = None, logits: Logits = None) -> Response:
    return await classify(request, model, top_k, logits)


@router.post("/v1/models/{name}/classify", summary="Classify images with a named model", **_ROUTE)
async def classify_with(
    request: Request, name: str, model: ModelName, top_k: TopK = None, logits: Logits = None
) -> Response:
    return await classify(request, model, top_k, logits)


QUERY_OPTIONS = frozenset({"top_k", "logits"})


async def classify(request: Request, name: str, top_k: int | None, logits: bool | None) -> Response:
    engine: Engine = request.app.state.engine
    unknown = sorted(set(request.query_params) - QUERY_OPTIONS)
    if unknown:  # a misspelt option silently ignored would be a wrong answer the client cannot see
        raise InvalidParameter(f"unknown query parameter {unknown[0]!r}; the options are top_k and logits")
    body = await read_images(request, max_images=engine.limits.max_images_per_request)
    request.state.log_fields = {"images": len(body.images)}
    k = body.top_k if body.top_k is not None else top_k
    with_logits = _first_given(body.logits, logits, True)
    work = engine.classify(body.images, model=name, top_k=k, logits=with_logits)
    result = await until_disconnected(request, work)
    request.state.log_fields.update(timing_fields(result.timings))
    return JSONResponse(classification_body(result), headers={"Server-Timing": server_timing(result.timings)})


def classification_body(result: Classification) -> dict[str, Any]:
    predictions = []
    for prediction in result.predictions:
        entry: dict[str, Any] = {
            "top_k": [{"index": c.index, "label": c.label, "score": c.score} for c in prediction.top_k]
        }
        if prediction.logits is not None:
            entry["logits"] = prediction.logits
        predictions.append(entry)
    return {"model": result.model, "predictions": predictions}


def _first_given(*values: T | None) -> T:
    return next(v for v in values if v is not None)
