"""`/docs`: Swagger UI from files installed with the service, under a Content-Security-Policy of its own.

FastAPI's own page loads Swagger UI from a CDN, which a deployment without internet cannot reach, and starts it
with an inline script, which the app's policy (nothing but this origin's files) refuses: in a browser it was a
blank page. Here the assets are those the fastapi-offline package ships (Swagger UI 5, which reads OpenAPI 3.1),
served under /docs/static, and the page's policy allows its one inline script by its SHA-256. That policy is on
this page alone: every other response, the assets included, keeps the app's.

/docs is public, like /openapi.json, the description it shows. ReDoc is not served: /redoc leads here.
"""

from __future__ import annotations

import base64
import hashlib
import re
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(str(files("fastapi_offline") / "static"))  # swagger-ui-bundle.js, swagger-ui.css, favicon.png
STATIC = "/docs/static"
_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)  # the inline ones: those with a src have attributes


def docs_policy(scripts: list[str]) -> str:
    """The app's policy, with what Swagger UI needs besides: `scripts` are the page's inline scripts."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    return (
        f"default-src 'none'; script-src 'self' {hashes}; style-src 'self'; form-action 'self'; "
        # its stylesheet draws some icons (the arrow of each select, the copy button) as data: SVG images
        "img-src 'self' data:; "
        # it fetches /openapi.json, and "Try it out" sends its requests, to this origin
        "connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


def add_docs(app: FastAPI) -> None:
    """Serves /docs (with its assets under /docs/static) and sends /redoc there; the app is built with neither."""
    assert app.docs_url is None and app.redoc_url is None and app.openapi_url
    app.mount(STATIC, StaticFiles(directory=ASSETS), name="docs-static")

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_swagger_ui_html(
            openapi_url=root + app.openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{STATIC}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{STATIC}/swagger-ui.css",
            swagger_favicon_url=f"{root}{STATIC}/favicon.png",
            swagger_ui_parameters=app.swagger_ui_parameters,
        )
        html = page.body.decode()
        return HTMLResponse(html, headers={"content-security-policy": docs_policy(_INLINE_SCRIPT.findall(html))})

    @app.get("/redoc", include_in_schema=False)
    def redoc(request: Request) -> RedirectResponse:
        return RedirectResponse(request.scope.get("root_path", "") + "/docs", status_code=308)
