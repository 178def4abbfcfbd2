"""GET /docs (Swagger UI) and /redoc (ReDoc) from assets installed with the package: no CDN, so the API
page works on a network without internet access.

The JavaScript and CSS come from the `fastapi-standalone-docs` wheel (a `serve` dependency), which ships the
upstream Swagger UI and ReDoc bundles with their licence files (Apache-2.0, MIT); only its static files are
used. Pages are FastAPI's own HTML with those URLs, Google Fonts off and Swagger's online validator off.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.staticfiles import StaticFiles

ASSETS_URL = "/docs/assets"


def assets_dir() -> Path:
    import fastapi_standalone_docs

    return Path(fastapi_standalone_docs.__file__).parent / "static"


def install(app: FastAPI) -> None:
    app.mount(ASSETS_URL, StaticFiles(directory=assets_dir()), name="docs-assets")

    def urls(request: Request) -> tuple[str, str]:
        root = request.scope.get("root_path", "")
        return root + (app.openapi_url or "/openapi.json"), root + ASSETS_URL

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui(request: Request):
        openapi_url, assets = urls(request)
        return get_swagger_ui_html(openapi_url=openapi_url, title=f"{app.title} - Swagger UI",
                                   swagger_js_url=f"{assets}/swagger/swagger-ui-bundle.js",
                                   swagger_css_url=f"{assets}/swagger/swagger-ui.css",
                                   swagger_favicon_url=f"{assets}/fastapi/favicon.png",
                                   swagger_ui_parameters={"validatorUrl": None, "displayOperationId": True})

    @app.get("/redoc", include_in_schema=False)
    async def redoc(request: Request):
        openapi_url, assets = urls(request)
        return get_redoc_html(openapi_url=openapi_url, title=f"{app.title} - ReDoc",
                              redoc_js_url=f"{assets}/redoc/redoc.standalone.js",
                              redoc_favicon_url=f"{assets}/fastapi/favicon.png", with_google_fonts=False)
