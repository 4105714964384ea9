"""`item serve`'s application: the API under /v1, the console under /console, health and metrics.

Three thin ASGI layers wrap every request, cheapest first: a cap on the body's size (checked against the
declared length, and again while the body streams in), security headers (a Content-Security-Policy that allows
nothing but this origin's own files; /docs alone states its own, see docs.py), and metrics by route template.
"""

from __future__ import annotations

import os
import time
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError, InterfaceError, OperationalError

from worker.intake.filing import Intake
from worker.ledger.store import Ledger
from worker.ops import metrics
from worker.settings import Settings
from worker.web import api, bank, console, review
from worker.web.auth import requires
from worker.web.docs import add_docs
from worker.web.errors import HttpError, http_error, invalid_request, ledger_unavailable, unstorable
from worker.web.filing import GroupFiler
from worker.web.keys import Authenticator, Principal
from worker.web.replica import MarksWrites, Reads

HERE = Path(__file__).parent
BODY_MARGIN = 64 * 1024  # JSON around the base64 of the largest inline image
CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; script-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"content-security-policy", CSP.encode()),
]


@dataclass
class WebState:
    settings: Settings
    ledger: Ledger
    keys: Authenticator
    intake: Intake
    reads: Reads  # where reads that may be a little stale go (worker/web/replica.py)
    filer: GroupFiler | None = None  # started with the app (its thread belongs to the serving process)
    tenant_labels: Any = None  # worker.ops.tenant_labels.TenantLabels, made at the first /metrics


def create_app(settings: Settings) -> FastAPI:
    ledger = Ledger(settings.database_url)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        web = app.state.web
        web.filer = GroupFiler(web.intake)
        yield
        web.filer.stop()
        web.reads.dispose()
        ledger.dispose()

    app = FastAPI(
        title="ITEM moderation API",
        version="1",
        summary="File image checks for AI-generation detection and read their results.",
        lifespan=lifespan,
        docs_url=None,  # served by add_docs, from the package's files rather than a CDN
        redoc_url=None,
    )
    reads = Reads(ledger, settings.database_replica_url)
    app.state.web = WebState(settings, ledger, Authenticator(ledger), Intake(settings, ledger), reads)
    app.add_exception_handler(HttpError, http_error)
    for broken in (OperationalError, InterfaceError):
        app.add_exception_handler(broken, ledger_unavailable)
    app.add_exception_handler(DataError, unstorable)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(console.SignInRequired, console.sign_in_redirect)
    app.add_exception_handler(console.Forbidden, console.forbidden_page)
    app.include_router(api.router)
    app.include_router(bank.router)
    app.include_router(console.router)
    app.include_router(review.router)
    app.mount("/console/static", StaticFiles(directory=HERE / "static"), name="static")
    _add_service_routes(app)
    add_docs(app)
    app.add_middleware(Measured)
    if reads.replica is not None:  # without a replica every read is the primary's: nothing to mark
        app.add_middleware(MarksWrites)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(BodyCap, limit=body_limit(settings))
    return app


def body_limit(settings: Settings) -> int:
    return (settings.max_b64_bytes * 4) // 3 + BODY_MARGIN


def _add_service_routes(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    def home() -> Response:
        return RedirectResponse("/console", status_code=303)

    @app.get("/healthz", tags=["service"])
    def healthz() -> dict:
        """The process answers (no dependency is probed: for a liveness probe)."""
        return {"ok": True}

    @app.get("/readyz", tags=["service"], responses={503: {"description": "The ledger is unreachable or behind."}})
    def readyz(request: Request) -> Response:
        """The ledger answers and its schema is the one this code expects (for a readiness probe)."""
        from worker.ops.health import check_health

        settings = request.app.state.web.settings
        report = check_health(settings.model_copy(update={"broker_url": None}), probes=("database", "migrations"))
        return JSONResponse(report, status_code=200 if report["ok"] else 503)

    @app.get("/metrics", tags=["service"], response_class=Response)
    def metrics_text(who: Principal = Depends(requires("read"))) -> Response:
        """Prometheus metrics of this process (a `read` key: Prometheus sends it as a bearer token). A tenant's key
        reads the deployment's figures and its own tenant's, never another tenant's (samples labelled `tenant`)."""
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest
        from prometheus_client.multiprocess import MultiProcessCollector

        from worker.ops.tenant_labels import TenantLabels

        registry = REGISTRY
        if "PROMETHEUS_MULTIPROC_DIR" in os.environ:  # `item serve --workers N`: every process's samples
            registry = CollectorRegistry()
            MultiProcessCollector(registry)
        web = app.state.web
        web.tenant_labels = web.tenant_labels or TenantLabels(web.settings, web.ledger)
        folded = SimpleNamespace(collect=lambda: web.tenant_labels.fold(registry.collect()))  # a bounded `tenant`
        if not who.all_tenants:
            everyone = folded
            folded = SimpleNamespace(collect=lambda: metrics_of_tenant(everyone.collect(), who.tenant_id))
        return Response(generate_latest(folded), media_type=CONTENT_TYPE_LATEST)


def metrics_of_tenant(families, tenant_id: str):
    """The metric families with every sample of another tenant left out (those without a `tenant` label stay)."""
    from prometheus_client.metrics_core import Metric

    for family in families:
        kept = Metric(family.name, family.documentation, family.type, family.unit)
        kept.samples = [sample for sample in family.samples if sample.labels.get("tenant", tenant_id) == tenant_id]
        yield kept


class BodyCap:
    """413 for a body over `limit` bytes, before it is read into memory."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await _too_large(self.limit, send)
        seen, exceeded = 0, False

        async def counted():
            nonlocal seen, exceeded
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                exceeded = True
                raise _BodyTooLarge()
            return message

        async def unless_exceeded(message):
            if not exceeded:  # the framework answers a body it could not read with its own error: ours goes instead
                await send(message)

        with suppress(_BodyTooLarge):
            await self.app(scope, counted, unless_exceeded)
        if exceeded:
            await _too_large(self.limit, send)


class _BodyTooLarge(Exception):
    pass


async def _too_large(limit: int, send) -> None:
    response = JSONResponse(
        {"error": {"code": "request.too_large", "message": f"The request body is over {limit:,} bytes."}},
        status_code=413,
    )
    await response({"type": "http"}, None, send)


class SecurityHeaders:
    """Adds the security headers to every response; one that states its own Content-Security-Policy (/docs) keeps
    it instead of the app's."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                headers = message.get("headers", [])
                own_policy = any(name.lower() == b"content-security-policy" for name, _ in headers)
                added = [h for h in SECURITY_HEADERS if not (own_policy and h[0] == b"content-security-policy")]
                message["headers"] = [*headers, *added]
                if scope.get("scheme") == "https":
                    message["headers"].append((b"strict-transport-security", b"max-age=31536000"))
            await send(message)

        await self.app(scope, receive, with_headers)


class Measured:
    """Counts and times requests by route template: a label never holds a check id or a query."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def noting(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, noting)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            metrics.HTTP_REQUESTS.labels(route, scope["method"], str(status[0])).inc()
            metrics.HTTP_SECONDS.labels(route).observe(time.perf_counter() - started)


def app_from_environment() -> FastAPI:
    """The factory `item serve` hands uvicorn: each server process builds its app from ITEM_* settings."""
    from worker.settings import load_settings

    return create_app(load_settings())
