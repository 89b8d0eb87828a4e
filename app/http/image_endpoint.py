"""What every image endpoint (classify, embed, explain) does around its engine call: read the images and options,
run the work until the client goes away, note the timings for the log line and the Server-Timing header."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response

from app.engine.facade import Engine, Timings
from app.http.bodies import read_images
from app.http.dependencies import engine_of
from app.http.disconnect import until_disconnected
from app.http.responses import JSONResponse
from app.http.timing import server_timing, timing_fields

Options = TypeVar("Options", bound=BaseModel)


class Timed(Protocol):
    @property
    def timings(self) -> Timings: ...


Result = TypeVar("Result", bound=Timed)


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
