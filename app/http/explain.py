"""`POST /v1/explain` and `POST /v1/models/{name}/explain`: top-k classes and attention-rollout maps."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.engine.facade import Engine, Explanations
from app.http.classify import scores
from app.http.image_endpoint import answer, image_routes
from app.http.schemas import ERROR_RESPONSES, ExplainJSON, ExplainOptions, ExplainResponse

router = APIRouter(tags=["explain"])


async def explain(request: Request, model: str) -> Response:
    async def work(engine: Engine, images: list[bytes], options: ExplainOptions) -> Explanations:
        return await engine.explain(images, model=model, top_k=options.top_k, overlay=options.overlay)

    wants_png = "image/png" in request.headers.get("accept", "")

    def body(result: Explanations, options: ExplainOptions) -> dict[str, Any] | Response:
        if wants_png and options.overlay and len(result.explanations) == 1:
            return Response(result.explanations[0].overlay_png, media_type="image/png")
        return explanations_body(result)

    return await answer(request, ExplainOptions, work, body)


image_routes(
    router,
    "explain",
    explain,
    summaries=(
        "Explain the default model's classification of images",
        "Explain a named model's classification of images",
    ),
    response_model=ExplainResponse,
    json_body=ExplainJSON,
    responses={**ERROR_RESPONSES, 200: {"content": {"image/png": {}}}},
)


def explanations_body(result: Explanations) -> dict[str, Any]:
    explanations = []
    for explanation in result.explanations:
        entry: dict[str, Any] = {
            "top_k": scores(explanation.prediction.top_k),
            "grid": list(explanation.attention.shape),
            "attention": explanation.attention,
        }
        if explanation.overlay_png is not None:
            entry["overlay"] = "data:image/png;base64," + base64.b64encode(explanation.overlay_png).decode("ascii")
        explanations.append(entry)
    return {"model": result.model, "explanations": explanations}
