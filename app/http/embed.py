"""`POST /v1/embed` and `POST /v1/models/{name}/embed`: image embeddings, from the classify batches' own forward."""

from __future__ import annotations

import base64
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.engine.facade import Embeddings, Engine
from app.http.image_endpoint import answer, image_routes
from app.http.schemas import EmbedJSON, EmbedOptions, EmbedResponse

router = APIRouter(tags=["embed"])


async def embed(request: Request, model: str) -> Response:
    async def work(engine: Engine, images: list[bytes], options: EmbedOptions) -> Embeddings:
        return await engine.embed(images, model=model, normalize=options.normalize)

    return await answer(request, EmbedOptions, work, embeddings_body)


image_routes(
    router,
    "embed",
    embed,
    summaries=("Embed images with the default model", "Embed images with a named model"),
    response_model=EmbedResponse,
    json_body=EmbedJSON,
)


def embeddings_body(result: Embeddings, options: EmbedOptions) -> dict[str, Any]:
    vectors = result.vectors
    encoded: Any = vectors
    if options.encoding_format == "base64":
        little_endian = vectors.astype("<f4", copy=False)
        encoded = [base64.b64encode(row.tobytes()).decode("ascii") for row in little_endian]
    return {
        "model": result.model,
        "dim": int(vectors.shape[1]),
        "normalized": result.normalized,
        "encoding_format": options.encoding_format,
        "embeddings": encoded,
    }
