"""The console: server-rendered pages for moderators and operators, signed in with a key.

Sign-in trades a key for a session: the cookie holds a random token (HttpOnly, SameSite=Strict, Secure over
TLS), the ledger its hash. Every form carries the session's CSRF token; the sign-in form, made before any
session exists, a token it also sets as a cookie (double submit). Jinja2 escapes everything it renders, so a
caption or phrase a model wrote is text, never markup; the Content-Security-Policy would refuse a script anyway.

Every page is narrowed to the visitor's tenant: another tenant's check, image or thumbnail is not found, as a
missing one is (identical bytes are shared across tenants by sha256, so an image is served only through a check
the visitor may see). An operator key (of all tenants) sees every tenant, picks one with `?tenant=`, and alone
activates versions.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from urllib.parse import quote, urlencode

import jinja2
from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from worker.ledger import access, reviews, tenants
from worker.ledger.models import utcnow
from worker.ledger.review_queue import review_figures
from worker.ledger.views import delivery_dict
from worker.ops import metrics
from worker.web.api import as_utc, decode_cursor, encode_cursor
from worker.web.keys import Principal

router = APIRouter(prefix="/console", include_in_schema=False)
SESSION_COOKIE = "item_session"
SIGNIN_COOKIE = "item_signin"
PAGE = 50
BROWSER_FORMATS = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif"}
DECISION_NAMES = {"ai_generated": "AI-generated", "authentic": "Authentic", "unsure": "Unsure"}
WORKER_ALIVE = timedelta(seconds=30)  # three missed heartbeats

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"),
    autoescape=True,  # every template, whatever its name: model output is never markup
    undefined=jinja2.StrictUndefined,
)


def clock(seconds: float) -> str:
    """A frame's time as a player shows it, to a tenth: 3.2 → 0:03.2, 75.04 → 1:15.0."""
    minutes, tenths = divmod(round(seconds * 10), 600)
    return f"{minutes}:{tenths / 10:04.1f}"


_templates.filters["clock"] = clock


class SignInRequired(Exception):  # noqa: N818  (a redirect, not an error)
    def __init__(self, to: str):
        self.to = to


class Forbidden(Exception):  # noqa: N818
    pass


@dataclass(frozen=True)
class Visitor:
    who: Principal
    csrf: str
    token_sha256: str


def render(request: Request, template: str, status: int = 200, **values) -> HTMLResponse:
    page = _templates.get_template(template).render(request=request, **values)
    return HTMLResponse(page, status_code=status, headers={"Cache-Control": "no-store"})


async def sign_in_redirect(request: Request, error: SignInRequired) -> Response:
    return RedirectResponse(f"/console/signin?next={quote(error.to, safe='')}", status_code=303)


async def forbidden_page(request: Request, error: Forbidden) -> Response:
    return render(request, "message.html", 403, visitor=None, title="Not allowed",
                  message="This key does not have the scope this page needs.")  # fmt: skip


def visitor(request: Request) -> Visitor:
    """The signed-in visitor; anyone else is sent to the sign-in page (and back here afterwards)."""
    token = request.cookies.get(SESSION_COOKIE)
    if token:
        token_sha256 = hashlib.sha256(token.encode()).hexdigest()
        web = request.app.state.web
        with web.ledger.session() as session:
            found = access.live_session(session, token_sha256)
        if found is not None:
            row, key = found
            return Visitor(Principal.of(key), row.csrf_token, token_sha256)
    metrics.AUTH_FAILURES.labels("session").inc()
    path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    raise SignInRequired(path)


def needs(scope: str):
    def checked(request: Request, form_visitor: Visitor = Depends(visitor)) -> Visitor:
        if not form_visitor.who.may(scope):
            metrics.AUTH_FAILURES.labels("scope").inc()
            raise Forbidden()
        return form_visitor

    return checked


def operator(request: Request, form_visitor: Visitor = Depends(needs("admin"))) -> Visitor:
    """An admin key of all tenants: what changes the whole deployment (activating a version) needs."""
    if not form_visitor.who.all_tenants:
        metrics.AUTH_FAILURES.labels("scope").inc()
        raise Forbidden()
    return form_visitor


# What an operator's tenant pick may be (a query parameter or a form field): empty or "all" (every tenant), or a
# tenant id; anything else is refused (422) before it reaches a query.
TENANT_PICK = rf"^(|{tenants.TENANT_ID.pattern[1:-1]})$"


def unknown_decision(request: Request, who: Visitor) -> Response:
    """The page a decision form answers when its label is none of the decisions (the check and review pages)."""
    return render(request, "message.html", 422, visitor=who, title="Unknown decision",
                  message=f"A decision is one of: {', '.join(DECISION_NAMES.values())}.")  # fmt: skip


def tenant_scope(visitor_: Visitor, tenant: str | None) -> str | None:
    """The tenant a page reads: the visitor's own; an operator's pick (`?tenant=`), or None for all."""
    return visitor_.who.tenant_scope(None if tenant in (None, "", "all") else tenant)


def tenant_choices(session, visitor_: Visitor) -> list[str]:
    """The tenants an operator may pick among on a page (none for a tenant's visitor: it sees its own only)."""
    return tenants.tenant_ids(session) if visitor_.who.all_tenants else []


def checked_form(visitor_: Visitor, csrf: str) -> None:
    if not hmac.compare_digest(visitor_.csrf.encode(), csrf.encode()):
        metrics.AUTH_FAILURES.labels("csrf").inc()
        raise Forbidden()


# ---------------------------------------------------------------------- signing in


@router.get("/signin")
def signin_page(request: Request, next: str = "/console", error: str | None = None) -> Response:
    token = secrets.token_urlsafe(24)
    page = render(request, "signin.html", visitor=None, csrf=token, next=_local(next), error=error)
    page.set_cookie(SIGNIN_COOKIE, token, httponly=True, samesite="strict", secure=_tls(request), path="/console")
    return page


@router.post("/signin")
def signin(request: Request, key: str = Form(max_length=200), csrf: str = Form(max_length=100),
           next: str = Form("/console", max_length=2000)) -> Response:  # fmt: skip
    expected = request.cookies.get(SIGNIN_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), csrf.encode()):
        metrics.AUTH_FAILURES.labels("csrf").inc()
        return RedirectResponse("/console/signin?error=expired", status_code=303)
    web = request.app.state.web
    who, reason = web.keys.principal(key)
    if who is None or not (who.may("read") or who.may("review")):
        metrics.AUTH_FAILURES.labels(reason if who is None else "scope").inc()
        return RedirectResponse(f"/console/signin?error=key&next={quote(_local(next), safe='')}", status_code=303)
    token = secrets.token_urlsafe(32)
    with web.ledger.session() as session:
        hours = timedelta(hours=web.settings.console_session_hours)
        token_sha256 = hashlib.sha256(token.encode()).hexdigest()
        access.add_session(session, token_sha256, who.key_id, secrets.token_urlsafe(32), hours)
    response = RedirectResponse(_local(next), status_code=303)
    response.set_cookie(SESSION_COOKIE, token, max_age=int(hours.total_seconds()), httponly=True, samesite="strict",
                        secure=_tls(request), path="/console")  # fmt: skip
    response.delete_cookie(SIGNIN_COOKIE, path="/console")
    return response


@router.post("/signout")
def signout(request: Request, csrf: str = Form(max_length=100), who: Visitor = Depends(visitor)) -> Response:
    checked_form(who, csrf)
    with request.app.state.web.ledger.session() as session:
        access.end_session(session, who.token_sha256)
    response = RedirectResponse("/console/signin", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path="/console")
    return response


def _local(path: str) -> str:
    """Only a path of this console is a place to go back to: never another site (an open redirect)."""
    return path if path.startswith("/console") and not path.startswith("//") and "\\" not in path else "/console"


def _tls(request: Request) -> bool:
    return request.url.scheme == "https"


# ---------------------------------------------------------------------- the review queue


@router.get("")
def review_queue(
    request: Request,
    who: Visitor = Depends(visitor),
    verdict: str = Query("fake", max_length=16),
    p_min: float | None = Query(None, ge=0, le=1),
    p_max: float | None = Query(None, ge=0, le=1),
    version: str | None = Query(None, max_length=64),
    since: datetime | None = None,
    until: datetime | None = None,
    cursor: str | None = Query(None, max_length=200),
    tenant: str | None = Query(None, max_length=64, pattern=TENANT_PICK),
) -> Response:
    web = request.app.state.web
    verdicts, after = None if verdict == "any" else [verdict], decode_cursor(cursor)
    scope = tenant_scope(who, tenant)

    def read(session):
        rows = web.ledger.list_checks(
            session, status="done", verdict=verdicts, pipeline_version_id=version or None, since=as_utc(since),
            until=as_utc(until), p_fake_at_least=p_min, p_fake_below=p_max, after=after, limit=PAGE + 1,
            tenant_id=scope,
        )  # fmt: skip
        return rows, web.ledger.versions(session), tenant_choices(session, who)

    rows, versions, choices = web.reads.run(request, read)
    filters = {"verdict": verdict, "p_min": p_min, "p_max": p_max, "version": version, "since": since, "until": until}
    filters["tenant"] = scope if who.who.all_tenants else None
    next_cursor = encode_cursor(rows[PAGE - 1]) if len(rows) > PAGE else None
    query = {k: v for k, v in filters.items() if v not in (None, "")}
    next_query = urlencode({**query, "cursor": next_cursor}) if next_cursor else None
    return render(request, "queue.html", visitor=who, rows=rows[:PAGE], filters=filters, versions=versions,
                  tenants=choices, next_query=next_query)  # fmt: skip


# ---------------------------------------------------------------------- one check


@router.get("/checks/{check_id}")
def check_page(check_id: str, request: Request, who: Visitor = Depends(visitor)) -> Response:
    web = request.app.state.web

    def read(session) -> Response:
        check = web.ledger.get_check(session, check_id[:36], tenant_id=tenant_scope(who, None))
        if check is None:
            return render(request, "message.html", 404, visitor=who, title="No such check",
                          message="No check has that id.")  # fmt: skip
        image = web.ledger.get_image(session, check.image_sha256) if check.image_sha256 else None
        mine = {"tenant_id": check.tenant_id}
        values = {
            "check": check,
            "image": image,
            "objects": check.objects or [],
            "deliveries": [delivery_dict(row) for row in reviews.deliveries_of(session, check.id, **mine)],
            "elsewhere": reviews.same_upload_elsewhere(session, check),
            "decisions": reviews.decisions_of(session, check.id, **mine),
            "reused": [stage for stage, ms in (check.timings_ms or {}).items() if ms == 0.0],
            "kept_frames": reviews.kept_thumbnails(session, check),
        }
        return render(request, "check.html", visitor=who, names=DECISION_NAMES, **values)

    return web.reads.run(request, read)


@router.post("/checks/{check_id}/decision")
def decide(
    check_id: str,
    request: Request,
    label: str = Form(max_length=16),
    csrf: str = Form(max_length=100),
    note: str = Form("", max_length=2000),
    who: Visitor = Depends(needs("review")),
) -> Response:
    checked_form(who, csrf)
    web = request.app.state.web
    if label not in reviews.LABELS:
        return unknown_decision(request, who)
    with web.ledger.session() as session:
        check = web.ledger.get_check(session, check_id[:36], tenant_id=tenant_scope(who, None))
        if check is None:
            return render(request, "message.html", 404, visitor=who, title="No such check", message="No such check.")
        reviews.record_decision(
            session, check.id, label, who.who.name, who.who.key_id, note.strip() or None, tenant_id=check.tenant_id
        )
    return RedirectResponse(f"/console/checks/{check.id}", status_code=303)


@router.get("/checks/{check_id}/image")
def check_image(check_id: str, request: Request, who: Visitor = Depends(visitor)) -> Response:
    """The upload itself when its bytes are stored (inline uploads) in a format browsers show; else the
    thumbnail the worker kept. Never a fetch of the upload's URL. Only through a check the visitor may see: the
    bytes are shared by every tenant that sent them, the check is not."""
    web = request.app.state.web

    def read(session) -> Response | None:
        check = web.ledger.get_check(session, check_id[:36], tenant_id=tenant_scope(who, None))
        image = web.ledger.get_image(session, check.image_sha256) if check and check.image_sha256 else None
        blob_sha = (check.source or {}).get("blob") if check else None
        if image is not None and blob_sha == image.sha256 and image.format in BROWSER_FORMATS:
            data = web.ledger.get_blobs(session, [blob_sha]).get(blob_sha)
            if data is not None:
                return _image(data, BROWSER_FORMATS[image.format])
        return None

    return web.reads.run(request, read) or check_thumbnail(check_id, request, who)


@router.get("/checks/{check_id}/thumbnail")
def check_thumbnail(check_id: str, request: Request, who: Visitor = Depends(visitor)) -> Response:
    web = request.app.state.web

    def read(session) -> Response:
        check = web.ledger.get_check(session, check_id[:36], tenant_id=tenant_scope(who, None))
        thumbnail = reviews.get_thumbnail(session, check.image_sha256) if check and check.image_sha256 else None
        if thumbnail is None:
            return Response(status_code=404)
        return _image(thumbnail.data, "image/jpeg")

    return web.reads.run(request, read)


@router.get("/checks/{check_id}/frames/{index}")
def frame_thumbnail(check_id: str, index: str, request: Request, who: Visitor = Depends(visitor)) -> Response:
    """The thumbnail of a video's or an animation's sampled frame, by its place in the check's list: only through a
    check the visitor may see, and never by a sha256 the visitor names (no answer about another image's frames)."""
    web = request.app.state.web

    def read(session) -> Response:
        check = web.ledger.get_check(session, check_id[:36], tenant_id=tenant_scope(who, None))
        frames = ((check.media or {}).get("frames") or []) if check else []
        place = int(index) if index.isascii() and index.isdigit() and len(index) <= 4 else len(frames)
        thumbnail = reviews.get_thumbnail(session, frames[place]["sha256"]) if place < len(frames) else None
        if thumbnail is None:
            return Response(status_code=404)
        return _image(thumbnail.data, "image/jpeg")

    return web.reads.run(request, read)


def _image(data: bytes, media_type: str) -> Response:
    headers = {"Cache-Control": "private, max-age=3600", "Content-Disposition": "inline"}
    return Response(data, media_type=media_type, headers=headers)


# ---------------------------------------------------------------------- operations


@router.get("/operations")
def operations(
    request: Request,
    who: Visitor = Depends(visitor),
    tenant: str | None = Query(None, max_length=64, pattern=TENANT_PICK),
) -> Response:
    web = request.app.state.web
    now = utcnow()
    hour, day = now - timedelta(hours=1), now - timedelta(days=1)
    scope = tenant_scope(who, tenant)
    mine = {"tenant_id": scope}  # the check figures; workers, versions and latency are the deployment's

    def read(session) -> dict:
        active = web.ledger.active_version(session)
        pinned = tenants.get_tenant(session, scope) if scope is not None else None
        return {
            "per_status": {
                "hour": reviews.status_counts_since(session, hour, **mine),
                "day": reviews.status_counts_since(session, day, **mine),
            },  # fmt: skip
            "finished_hour": reviews.finished_since(session, hour, **mine),
            "waiting": web.ledger.count_waiting(session, **mine),
            "latency": reviews.latency_percentiles(session, hour),
            "verdicts": reviews.verdicts_per_version(session, day, **mine),
            "workers": reviews.workers_seen(session, WORKER_ALIVE),
            "versions": web.ledger.versions(session),
            "active": active,
            "pinned": pinned.pipeline_version_id if pinned is not None else None,
            "rescores": reviews.rescore_counts(session, active.id, **mine) if active else {},
            "tenant": scope,
            "tenants": tenant_choices(session, who),
            "review": review_figures(session, scope, now),
        }

    return render(request, "operations.html", visitor=who, now=now, **web.reads.run(request, read))


@router.get("/versions/{version_id}/activate")
def confirm_activation(version_id: str, request: Request, who: Visitor = Depends(operator)) -> Response:
    web = request.app.state.web

    def read(session) -> Response:
        known = {row.id: row for row in web.ledger.versions(session)}
        if version_id not in known:
            return render(request, "message.html", 404, visitor=who, title="No such version",
                          message="Unknown version.")  # fmt: skip
        active = web.ledger.active_version(session)
        return render(request, "activate.html", visitor=who, version=known[version_id], active=active)

    return web.reads.run(request, read)


@router.post("/versions/{version_id}/activate")
def activate(
    version_id: str,
    request: Request,
    csrf: str = Form(max_length=100),
    confirm: str = Form(max_length=64),
    who: Visitor = Depends(operator),
) -> Response:
    checked_form(who, csrf)
    if confirm != version_id:  # the confirmation step: the operator types the version's id
        return RedirectResponse(f"/console/versions/{quote(version_id)}/activate", status_code=303)
    web = request.app.state.web
    with web.ledger.session() as session:
        if web.ledger.activate_version(session, version_id) is None:
            return render(request, "message.html", 404, visitor=who, title="No such version", message="Unknown.")
    return RedirectResponse("/console/operations", status_code=303)
