"""`GET /docs`: the API's reference page (Swagger UI), with its script and style served by the app from the
`fastapi-offline` package instead of a CDN, so that it works with no internet access.

FastAPI's own pages load their scripts from a CDN (a blank page offline); `create_app` turns them off for this one.
There is no ReDoc page: ReDoc 2 cannot read this API's OpenAPI 3.1 schema (its `$defs` references), CDN or not.
"""

from __future__ import annotations

from importlib.metadata import version
from importlib.resources import files
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from starlette.exceptions import HTTPException
from starlette.responses import FileResponse, HTMLResponse

router = APIRouter(include_in_schema=False)

DOCS_URL = "/docs"
OAUTH2_REDIRECT_URL = "/docs/oauth2-redirect"
ASSETS_URL = "/static/docs"  # under the demo page's /static/: open without an API key, like the pages
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
}
# The names are not versioned; the package's version in the query string is, so a browser may keep them a day.
CACHE_CONTROL = "public, max-age=86400"


@router.get(DOCS_URL)
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}",
        title=f"{request.app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT_URL}",
        swagger_js_url=_asset_url(root, "swagger-ui-bundle.js"),
        swagger_css_url=_asset_url(root, "swagger-ui.css"),
        swagger_favicon_url=f"{root}/favicon.ico",
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from the public validator
    )


@router.get(OAUTH2_REDIRECT_URL)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return get_swagger_ui_oauth2_redirect_html()


@router.get(ASSETS_URL + "/{name}")
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404, "Not Found")  # the same answer as any unknown path
    return FileResponse(
        _assets_folder() / name,
        media_type=media_type,
        headers={"Cache-Control": CACHE_CONTROL, "X-Content-Type-Options": "nosniff"},
    )


def _asset_url(root: str, name: str) -> str:
    return f"{root}{ASSETS_URL}/{name}?v={version('fastapi-offline')}"


def _assets_folder() -> Path:
    return Path(str(files("fastapi_offline").joinpath("static")))
