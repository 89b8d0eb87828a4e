"""What every image endpoint (classify, embed, explain) has: its two routes (the default model's and a named one's),
and around its engine call: read the images and options, run the work until the client goes away, note the timings
for the log line and the Server-Timing header."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from fastapi import APIRouter
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from app.engine.facade import Engine, Timings
from app.http.bodies import read_images
from app.http.dependencies import ModelName, engine_of
from app.http.disconnect import until_disconnected
from app.http.responses import JSONResponse
from app.http.schemas import ERROR_RESPONSES, ImagesJSON, image_body_doc
from app.http.timing import server_timing
from app.observability.logs import timing_fields

Options = TypeVar("Options", bound=BaseModel)


class Timed(Protocol):
    @property
    def timings(self) -> Timings: ...


Result = TypeVar("Result", bound=Timed)
Handler = Callable[[Request, str], Awaitable[Response]]  # (the request, the model's name) -> the answer


def image_routes(
    router: APIRouter,
    action: str,
    handler: Handler,
    *,
    summaries: tuple[str, str],  # the default model's route, a named model's
    response_model: type[BaseModel],
    json_body: type[ImagesJSON],
    responses: dict[int | str, dict[str, Any]] = ERROR_RESPONSES,
) -> None:
    """`POST /v1/{action}` (the default model) and `POST /v1/models/{name}/{action}`, both answered by `handler`."""

    async def default(request: Request, model: ModelName) -> Response:
        return await handler(request, model)

    async def named(request: Request, name: str, model: ModelName) -> Response:
        return await handler(request, model)

    documented: dict[str, Any] = {
        "methods": ["POST"],
        "response_model": response_model,
        "responses": responses,
        "openapi_extra": image_body_doc(json_body),
    }
    router.add_api_route(f"/v1/{action}", default, name=f"{action}_default", summary=summaries[0], **documented)
    router.add_api_route(
        f"/v1/models/{{name}}/{action}", named, name=f"{action}_with", summary=summaries[1], **documented
    )


async def answer(
    request: Request,
    options: type[Options],
    work: Callable[[Engine, list[bytes], Options], Awaitable[Result]],
    body: Callable[[Result, Options], dict[str, Any] | Response],
) -> Response:
    """Read the request, `work(engine, images, options)`, and answer `body(result, options)`: JSON, unless it made
    a response of its own."""
    engine = engine_of(request)
    read = await read_images(request, max_images=engine.limits.max_images_per_request, options=options)
    request.state.log_fields = {"images": len(read.images)}
    result = await until_disconnected(request, work(engine, read.images, read.options))
    request.state.log_fields.update(timing_fields(result.timings))
    content = body(result, read.options)
    response = content if isinstance(content, Response) else JSONResponse(content)
    response.headers["Server-Timing"] = server_timing(result.timings)
    return response
