"""`GET /`: the demo page, and `GET /static/{name}`: its script, style and icon, shipped in the package
(`app/http/static/`); the icon is `GET /favicon.ico` too.

Only the files named in `STATIC_FILES` are served, so no request path can reach anything else in the package. The page
holds no data and calls the API from the browser with the key the person types in, so it needs no key itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from fastapi import APIRouter, Request
from starlette.exceptions import HTTPException
from starlette.responses import Response

router = APIRouter(include_in_schema=False)

STATIC_FILES = {
    "demo.js": "text/javascript; charset=utf-8",
    "demo.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
FAVICON = "favicon.svg"
PAGE = "index.html"
# The page, its script and style, and the API all come from this origin; images are the previews (blob:) and the
# attention overlays (data:). Nothing inline, nothing from elsewhere, and no framing (the page asks for an API key).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'"
)
# The names are not versioned, so a browser revalidates every time; the ETag makes that a 304 with no body.
CACHE_CONTROL = "no-cache"


@dataclass(frozen=True)
class _Asset:
    content: bytes
    etag: str


@router.get("/")
async def page(request: Request) -> Response:
    response = _serve(request, PAGE, "text/html; charset=utf-8")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@router.get("/favicon.ico")
async def favicon(request: Request) -> Response:
    """Where browsers look for an icon unasked (the docs pages name it too): the SVG, which they all read."""
    return _serve(request, FAVICON, STATIC_FILES[FAVICON])


@router.get("/static/{name}")
async def static_file(request: Request, name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        raise HTTPException(404, "Not Found")  # the same answer as any unknown path
    return _serve(request, name, media_type)


def _serve(request: Request, name: str, media_type: str) -> Response:
    asset = _asset(name)
    headers = {"Cache-Control": CACHE_CONTROL, "ETag": asset.etag, "X-Content-Type-Options": "nosniff"}
    if asset.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(asset.content, media_type=media_type, headers=headers)


@cache  # a handful of small files, read once, on first use
def _asset(name: str) -> _Asset:
    content = files("app.http").joinpath("static", name).read_bytes()
    return _Asset(content, f'"{hashlib.sha256(content).hexdigest()[:32]}"')
