"""`POST /v1/classify` and `POST /v1/models/{name}/classify`."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.engine.facade import Classification, Engine
from app.http.image_endpoint import answer, image_routes
from app.http.schemas import ClassifyJSON, ClassifyOptions, ClassifyResponse
from app.pipeline.postprocess import ClassScore

router = APIRouter(tags=["classify"])


async def classify(request: Request, model: str) -> Response:
    async def work(engine: Engine, images: list[bytes], options: ClassifyOptions) -> Classification:
        return await engine.classify(images, model=model, top_k=options.top_k, logits=options.logits)

    return await answer(request, ClassifyOptions, work, classification_body)


image_routes(
    router,
    "classify",
    classify,
    summaries=("Classify images with the default model", "Classify images with a named model"),
    response_model=ClassifyResponse,
    json_body=ClassifyJSON,
)


def classification_body(result: Classification, options: ClassifyOptions) -> dict[str, Any]:
    predictions = []
    for prediction in result.predictions:
        entry: dict[str, Any] = {"top_k": scores(prediction.top_k)}
        if prediction.logits is not None:
            entry["logits"] = prediction.logits
        predictions.append(entry)
    return {"model": result.model, "predictions": predictions}


def scores(top_k: list[ClassScore]) -> list[dict[str, Any]]:
    return [{"index": c.index, "label": c.label, "score": c.score} for c in top_k]
