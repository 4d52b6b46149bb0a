"""/docs (Swagger UI) and /redoc served from local assets: an air-gapped cluster reaches no CDN.

The Swagger UI bundle and stylesheet, the ReDoc standalone bundle and the favicon come from the
``fastapi-offline`` package (MIT; it vendors swagger-ui-dist 5 and redoc 2 as plain files). Only its files
are used: the pages are FastAPI's own, pointed at ``/static/docs/``.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(fastapi_offline.__file__).parent / "static"
STATIC = "/static/docs"
OAUTH2_REDIRECT = "/docs/oauth2-redirect"

# The pages may load only what the API serves: ReDoc's sidebar would otherwise fetch a Redocly logo from
# cdn.redoc.ly (unconditionally), and nothing on these pages should reach out. Inline scripts and styles: FastAPI's
# page initialises Swagger UI / ReDoc inline and ReDoc styles itself with <style> elements.
CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; "
       "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")

router = APIRouter(include_in_schema=False)


def _page(response: HTMLResponse) -> HTMLResponse:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return _page(get_swagger_ui_html(
        openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title} - Swagger UI",
        oauth2_redirect_url=f"{root}{OAUTH2_REDIRECT}",
        swagger_js_url=f"{root}{STATIC}/swagger-ui-bundle.js", swagger_css_url=f"{root}{STATIC}/swagger-ui.css",
        swagger_favicon_url=f"{root}{STATIC}/favicon.png",
        # no badge from the public validator.swagger.io
        swagger_ui_parameters={"validatorUrl": None}))


@router.get(OAUTH2_REDIRECT)
async def swagger_ui_oauth2_redirect() -> HTMLResponse:
    return _page(get_swagger_ui_oauth2_redirect_html())


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    root = request.scope.get("root_path", "")
    return _page(get_redoc_html(
        openapi_url=f"{root}{request.app.openapi_url}", title=f"{request.app.title} - ReDoc",
        redoc_js_url=f"{root}{STATIC}/redoc.standalone.js", redoc_favicon_url=f"{root}{STATIC}/favicon.png",
        with_google_fonts=False))


def mount_assets(app: FastAPI) -> None:
    """The files the two pages load, under /static/docs/ (create the app with docs_url=None, redoc_url=None)."""
    app.mount(STATIC, StaticFiles(directory=ASSETS), name="docs-assets")
