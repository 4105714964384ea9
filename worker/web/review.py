"""The console's review page: a moderator works the review queue one item at a time, by keyboard.

`GET /console/review` takes (or gives back, on a reload) the item this moderator holds under a lease
(`worker.ledger.review_queue.take_next`) and shows its evidence; a decision or a skip is a form POST (with the
session's CSRF token and the lease token) answered by a redirect to the same page, which loads the next item at
once. The keys (f, a, u, s, ?) are a small script of this origin's own (review.js: the Content-Security-Policy
allows no other); without it the buttons still work, and their access keys too.
"""

from __future__ import annotations

from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from worker.ledger import review_queue, reviews
from worker.ledger.models import utcnow
from worker.ledger.review_queue import LeaseLost, ReviewError
from worker.web.console import (
    DECISION_NAMES,
    TENANT_PICK,
    Visitor,
    checked_form,
    needs,
    render,
    tenant_choices,
    tenant_scope,
    unknown_decision,
)

router = APIRouter(prefix="/console", include_in_schema=False)
BAND_NAMES = {band: name for name, band in review_queue.BANDS.items()}
KEYS = (("f", "ai_generated"), ("a", "authentic"), ("u", "unsure"))  # documented in the page and the README
GONE_CHECKS = 3  # items whose check is gone (past retention) dropped per page view before giving up


@router.get("/review")
def review_page(
    request: Request,
    who: Visitor = Depends(needs("review")),
    tenant: str | None = Query(None, max_length=64, pattern=TENANT_PICK),
    lost: bool = False,
) -> Response:
    web = request.app.state.web
    scope = tenant_scope(who, tenant)
    with web.ledger.session() as session:  # the primary: taking an item is a write
        values = {"tenants": tenant_choices(session, who), "tenant": scope, "lost": lost, "item": None}
        for _ in range(GONE_CHECKS):
            item = review_queue.take_next(session, who.who.key_id, scope, web.settings.review_lease_s)
            check = web.ledger.get_check(session, item.check_id, tenant_id=item.tenant_id) if item else None
            if item is None or check is not None:
                break
            review_queue.forget(session, item.check_id)
        if item is not None and check is not None:
            image = web.ledger.get_image(session, check.image_sha256) if check.image_sha256 else None
            left = max(0, int((item.lease_expires_at - utcnow()).total_seconds()))
            values |= {"item": item, "check": check, "image": image, "objects": check.objects or [], "left": left,
                       "kept_frames": reviews.kept_thumbnails(session, check)}  # fmt: skip
    return render(request, "review.html", visitor=who, keys=KEYS, names=DECISION_NAMES, bands=BAND_NAMES, **values)


@router.post("/review/{check_id}/decision")
def review_decision(
    check_id: str,
    request: Request,
    label: str = Form(max_length=16),
    token: str = Form(max_length=36),
    csrf: str = Form(max_length=100),
    tenant: str = Form("", max_length=64, pattern=TENANT_PICK),
    who: Visitor = Depends(needs("review")),
) -> Response:
    checked_form(who, csrf)
    web = request.app.state.web
    try:
        with web.ledger.session() as session:
            review_queue.decide(session, check_id[:36], token, label, who.who.key_id, who.who.name)
    except LeaseLost:
        return _next_item(tenant, lost=True)
    except ReviewError:
        return unknown_decision(request, who)
    return _next_item(tenant)


@router.post("/review/{check_id}/skip")
def review_skip(
    check_id: str,
    request: Request,
    token: str = Form(max_length=36),
    csrf: str = Form(max_length=100),
    tenant: str = Form("", max_length=64, pattern=TENANT_PICK),
    who: Visitor = Depends(needs("review")),
) -> Response:
    checked_form(who, csrf)
    with request.app.state.web.ledger.session() as session:
        review_queue.skip(session, check_id[:36], token, who.who.key_id)
    return _next_item(tenant)


def _next_item(tenant: str, *, lost: bool = False) -> Response:
    query = {key: value for key, value in (("tenant", tenant), ("lost", "1" if lost else "")) if value}
    return RedirectResponse("/console/review" + (f"?{urlencode(query)}" if query else ""), status_code=303)
