"""The versioned JSON API: file checks through the intake, read them back a page at a time.

`POST /v1/checks` is the HTTP form of the `item.check` task: the same arguments (less `path`: a file on the
server is no business of an HTTP client), the same idempotency on (external_id, active version), the same
checks of what a submission holds (worker.intake.text), the same stable error codes: a corrected resubmission
replaces a check that ended rejected or failed; another image under a live or answered check's id is a 409
`check.conflict`. It runs no model and answers in milliseconds; workers claim the row from the ledger.

Every check is one tenant's: a key files and reads its own tenant's checks only, and another tenant's check reads
exactly as a missing one (`404 check.not_found`, the same one query): no answer tells that it exists. An operator
key (`item keys create --all-tenants`) reads every tenant's, narrows with `?tenant=`, and names the tenant it files
for.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from sqlalchemy.exc import InterfaceError, OperationalError

from pipeline.core.errors import ItemError
from worker.intake import text
from worker.intake.filing import MAX_EXTERNAL_ID, CheckRequest
from worker.ledger import reviews, tenants
from worker.ledger.states import CheckStatus
from worker.ledger.views import as_time, check_dict, shown_target
from worker.web.auth import requires
from worker.web.errors import ErrorBody, HttpError, error_json
from worker.web.keys import Principal

MAX_PAGE = 200
NO_NUL = r"^[^\x00]*$"  # PostgreSQL text cannot hold NUL: refused here with a code, not as a database error
TENANT = tenants.TENANT_ID.pattern
# else 503: nothing filed (an id of the wrong form never gets past the request's model: 422 there)
TENANT_REFUSED = {"tenant.unknown": 422, "tenant.disabled": 403}

router = APIRouter(prefix="/v1", tags=["checks"])
_ERRORS = {401: {"model": ErrorBody}, 403: {"model": ErrorBody}}


class S3Object(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bucket: str = Field(max_length=63, pattern=NO_NUL)
    key: str = Field(max_length=1024, pattern=NO_NUL)


class UrlImage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    url: str = Field(
        max_length=8192, pattern=NO_NUL, description="An http(s) URL the worker fetches (never a private address)."
    )


class InlineImage(BaseModel):
    model_config = ConfigDict(extra="forbid")
    b64: str = Field(description="The image's bytes in base64, at most ITEM_MAX_B64_BYTES decoded.")


class S3Image(BaseModel):
    model_config = ConfigDict(extra="forbid")
    s3: S3Object | Annotated[str, Field(pattern=NO_NUL)] = Field(description='{"bucket", "key"} or "s3://bucket/key".')


ImageIn = UrlImage | InlineImage | S3Image  # exactly one source: a second one is an extra field


class CheckIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    external_id: str = Field(
        min_length=1, max_length=MAX_EXTERNAL_ID, pattern=NO_NUL, description="The platform's id of the upload."
    )
    image: ImageIn
    callback_url: str | None = Field(
        None, max_length=2048, pattern=NO_NUL, description="Where the signed result is POSTed."
    )
    tenant: str | None = Field(
        None,
        max_length=64,
        pattern=TENANT,
        description="The tenant to file for: an operator key (of all tenants) must name one; a tenant's key files "
        "for its own (naming another is 403 `tenant.forbidden`).",
    )

    # The broker intake's own checks of what a submission holds (worker.intake.text), so both refuse alike.
    @field_validator("external_id")
    @classmethod
    def _storable_id(cls, value: str) -> str:
        return _refuse(text.text_problem(value, "external_id", MAX_EXTERNAL_ID), value)

    @field_validator("image", "callback_url", mode="before")
    @classmethod
    def _storable_strings(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse(text.strings_problem(value, info.field_name), value)


def _refuse(problem: str | None, value: Any) -> Any:
    if problem:
        raise ValueError(problem)
    return value


class ObjectOut(BaseModel):
    phrase: str
    box: list[float]
    score: float | None = None
    misalignment: float | None = None


class GeneratorOut(BaseModel):
    generator: str = Field(description="A generator the attribution head was trained on (a benchmark folder).")
    p: float = Field(description="Its share of the head's probability.")


class C2paOut(BaseModel):
    present: bool = Field(description="Whether the bytes hold C2PA data, readable or not.")
    validation_state: Literal["valid", "untrusted", "invalid"] | None = Field(
        None, description="valid: intact and signed under a configured trust anchor; untrusted: intact, other signer"
    )
    claim_generator: str | None = None
    signer: str | None = None
    actions: list[dict[str, str | None]] = Field(
        default_factory=list, description="Actions whose digital source type declares generation by a trained model."
    )
    failures: list[str] = Field(default_factory=list, description="The validator's failure codes.")
    ai_generated: bool | None = None


class XmpOut(BaseModel):
    present: bool
    digital_source_type: str | None = Field(None, description="IPTC DigitalSourceType, as the packet wrote it.")
    ai_generated: bool | None = None


class ProvenanceErrorOut(BaseModel):
    code: str
    message: str


class ProvenanceOut(BaseModel):
    c2pa: C2paOut
    xmp: XmpOut
    declares_ai: bool = Field(description="An intact C2PA manifest or the XMP packet declares AI generation.")
    declared_by: list[Literal["c2pa", "xmp"]]
    errors: list[ProvenanceErrorOut] = Field(description="What could not be read; the image is scored all the same.")


class FrameOut(BaseModel):
    index: int = Field(description="Its place among the sampled frames, from 0, in time order.")
    time_s: float = Field(description="Seconds from the start of the video or animation.")
    sha256: str = Field(description="The frame's key (its thumbnail is kept under it).")
    p_fake: float
    verdict: Literal["real", "uncertain", "fake"] = Field(description="The frame's own; fake counts as flagged.")
    caption: str | None = None
    objects: list[ObjectOut] | None = None


class AggregationOut(BaseModel):
    rule: str = Field(description="kth_highest: fake when at least `k` frames are; p_fake is the k-th highest.")
    k: int
    flagged: int = Field(description="How many frames are fake.")
    frames: int


class MediaOut(BaseModel):
    kind: Literal["video", "animation"]
    format: str = Field(description="MP4, WEBM, MOV, MKV; GIF, WEBP, PNG (APNG) for an animation.")
    duration_s: float | None
    frame_rule: str = Field(description="How frames were sampled, with its version (even-v1:n=8: 8 evenly spaced).")
    aggregation: AggregationOut
    frames: list[FrameOut]


class ReusedFromOut(BaseModel):
    check_id: str = Field(description="The earlier check of a near-copy whose result this one repeats.")
    distance: int = Field(ge=0, le=256, description="The PDQ hashes' Hamming distance.")


class BankMatchOut(BaseModel):
    label: Literal["fake", "real"] = Field(description="The moderators' decision on the near-copy.")
    check_id: str = Field(description="The decided check.")
    decision_id: str = Field(description="The decision that made the label (its id in the check's decisions).")
    distance: int = Field(ge=0, le=256, description="The PDQ hashes' Hamming distance.")


class CheckOut(BaseModel):
    id: str
    external_id: str
    tenant: str = Field(description="The tenant (platform) whose check it is.")
    status: Literal["queued", "running", "done", "rejected", "failed"]
    created: bool | None = Field(None, description="On submission: false when this upload was already filed.")
    attempts: int
    error_code: str | None
    error_message: str | None
    p_fake: float | None
    verdict: Literal["real", "uncertain", "fake"] | None
    verdict_reason: str | None = Field(
        None,
        description="score; the provenance that made the verdict fake (provenance.c2pa, provenance.xmp); match: "
        "a moderator's decision on a near-copy (`match`)",
    )
    threshold: float | None = Field(description="fake at or above it")
    threshold_low: float | None = Field(None, description="real below it, uncertain up to `threshold`; null: no band")
    caption: str | None
    objects: list[ObjectOut] | None
    object_count: int | None
    attribution: list[GeneratorOut] | None = Field(
        None, description="An attribution head's likeliest generators; null with a real-or-fake head."
    )
    provenance: ProvenanceOut | None = Field(None, description="What the image's bytes declare; null: not read.")
    media: MediaOut | None = Field(None, description="A video's or an animation's frames; null: a still image.")
    reused_from: ReusedFromOut | None = Field(None, description="The near-copy answered from; null: checked anew.")
    match: BankMatchOut | None = Field(None, description="The moderator decision a near-copy matched, if any.")
    image_sha256: str | None
    pipeline_version_id: str
    timings_ms: dict[str, float] | None
    rescore_of: str | None
    callback_url: str | None = Field(description="Without its query string, which may hold a token.")
    created_at: str | None
    started_at: str | None
    finished_at: str | None


class DecisionIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: Literal["ai_generated", "authentic", "unsure"] = Field(
        description="A moderator's call on the upload; `item labels export` turns the latest one into a label."
    )
    note: str | None = Field(None, max_length=2000, pattern=NO_NUL, description="Why, for the next moderator.")


class DecisionOut(BaseModel):
    id: str
    check_id: str
    label: Literal["ai_generated", "authentic", "unsure"]
    reviewer: str = Field(description="The name of the key that decided.")
    note: str | None
    decided_at: str


class CheckPage(BaseModel):
    items: list[CheckOut]
    next_cursor: str | None = Field(description="Pass as `cursor` for the next page; null on the last page.")


class RejectedOut(ErrorBody):
    check: CheckOut


class VersionOut(BaseModel):
    id: str
    profile: str
    caption: str
    ground: str
    embed: str
    head: str
    created_at: str
    activated_at: str | None
    active: bool
    pinned: bool = Field(
        False, description="The version the tenant's new checks are filed under instead of the active one."
    )


def check_out(row, created: bool | None = None) -> dict:
    body = check_dict(row)
    body["status"] = str(body["status"])
    body["created"] = created
    body["tenant"] = row.tenant_id
    if body["callback_url"]:
        body["callback_url"] = shown_target(body["callback_url"])
    return body


@router.post(
    "/checks",
    status_code=202,
    response_model=CheckOut,
    responses={
        200: {"model": CheckOut, "description": "Already filed under the active version: that check."},
        413: {"model": ErrorBody},
        409: {"model": ErrorBody, "description": "check.conflict: the external id names another image's check."},
        429: {
            "model": ErrorBody,
            "description": "quota.exceeded (the tenant's rate) or quota.backlog (its backlog cap): nothing was "
            "filed; send again after the Retry-After header's seconds.",
            "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
        },
        422: {"model": RejectedOut | ErrorBody, "description": "Malformed, or filed and rejected at once."},
        503: {"model": ErrorBody},
        **_ERRORS,
    },
)
async def submit_check(
    body: CheckIn, request: Request, response: Response, who: Principal = Depends(requires("submit"))
) -> dict | Response:
    """Files a check of an image for the workers; idempotent on (external_id, active version)."""
    image = body.image.model_dump(exclude_none=True)
    tenant_id = _filing_tenant(who, body.tenant)
    try:
        filed = await request.app.state.web.filer.file(
            CheckRequest(body.external_id, image, body.callback_url), tenant_id
        )
    except ItemError as error:  # an unknown or disabled tenant; no version registered yet: nothing can be filed
        raise HttpError(TENANT_REFUSED.get(error.code, 503), error.code, error.message) from None
    except (OperationalError, InterfaceError):
        raise HttpError(503, "ledger.unavailable", "The ledger cannot be reached; nothing was filed. Retry.") from None
    except TimeoutError:  # it may still commit: a retry finds it, since filing is idempotent
        raise HttpError(503, "ledger.timeout", "The ledger did not answer in time. Retry.") from None
    if filed.refused is not None:
        retry = {"Retry-After": str(filed.refused.retry_after_s)}
        raise HttpError(429, filed.refused.code, filed.refused.message, retry)
    if filed.conflict is not None:
        raise HttpError(409, filed.conflict.code, filed.conflict.message)
    checked = check_out(filed.check, filed.created)
    if filed.check.status == CheckStatus.rejected:
        code, message = filed.check.error_code, filed.check.error_message
        return error_json(422, code, message, check=checked)
    if not filed.created:
        response.status_code = 200
    return checked


def _filing_tenant(who: Principal, asked: str | None) -> str:
    """The tenant a submission is filed for: the key's own; an operator key's must be named."""
    if who.all_tenants:
        if asked is None:
            message = "An operator key files for the tenant it names: add `tenant` to the body."
            raise HttpError(422, "tenant.required", message)
        return asked
    if asked is not None and asked != who.tenant_id:
        raise HttpError(403, "tenant.forbidden", "This key files checks for its own tenant only.")
    return who.tenant_id


TenantQuery = Annotated[
    str | None,
    Query(max_length=64, pattern=TENANT, description="An operator key's filter; a tenant's key reads its own anyway."),
]


@router.get("/checks/{check_id}", response_model=CheckOut, responses={404: {"model": ErrorBody}, **_ERRORS})
def get_check(
    check_id: Annotated[str, Path(pattern=NO_NUL)], request: Request, who: Principal = Depends(requires("read"))
) -> dict:
    web = request.app.state.web
    return web.reads.run(request, lambda session: check_out(_check_or_404(web, session, check_id, who)))


@router.get("/checks", response_model=CheckPage, responses={422: {"model": ErrorBody}, **_ERRORS})
def list_checks(
    request: Request,
    who: Annotated[Principal, Depends(requires("read"))],
    external_id: Annotated[str | None, Query(max_length=MAX_EXTERNAL_ID, pattern=NO_NUL)] = None,
    status: CheckStatus | None = None,
    verdict: Annotated[str | None, Query(max_length=16, pattern=NO_NUL)] = None,
    since: Annotated[datetime | None, Query(description="Filed at or after (ISO 8601; UTC if no zone).")] = None,
    until: Annotated[datetime | None, Query(description="Filed before.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
    tenant: TenantQuery = None,
) -> dict:
    """Checks newest first, `limit` at a time; follow `next_cursor` for the next page. A tenant's key lists its
    own tenant's checks; an operator key every tenant's, or one's with `tenant`."""
    web = request.app.state.web
    filters = {"external_id": external_id, "verdict": verdict, "since": as_utc(since), "until": as_utc(until)}
    filters["tenant_id"] = who.tenant_scope(tenant)
    after, wanted = decode_cursor(cursor), status.value if status else None

    def read(session) -> dict:
        rows = web.ledger.list_checks(session, status=wanted, after=after, limit=limit + 1, **filters)
        page, more = rows[:limit], len(rows) > limit
        return {"items": [check_out(row) for row in page], "next_cursor": encode_cursor(page[-1]) if more else None}

    return web.reads.run(request, read)


@router.post(
    "/checks/{check_id}/decisions",
    status_code=201,
    response_model=DecisionOut,
    tags=["decisions"],
    responses={404: {"model": ErrorBody}, 422: {"model": ErrorBody}, **_ERRORS},
)
def decide(
    check_id: Annotated[str, Path(pattern=NO_NUL)],
    body: DecisionIn,
    request: Request,
    who: Principal = Depends(requires("review")),
) -> dict:
    """Records a moderator's decision on a check, as the console's buttons do; every decision is kept, the latest
    counting."""
    web = request.app.state.web
    with web.ledger.session() as session:
        check = _check_or_404(web, session, check_id, who)
        note = (body.note or "").strip() or None
        decided = reviews.record_decision(
            session, check.id, body.label, who.name, who.key_id, note, tenant_id=check.tenant_id
        )
        return _decision_out(decided)


@router.get(
    "/checks/{check_id}/decisions",
    response_model=list[DecisionOut],
    tags=["decisions"],
    responses={404: {"model": ErrorBody}, **_ERRORS},
)
def list_decisions(
    check_id: Annotated[str, Path(pattern=NO_NUL)], request: Request, who: Principal = Depends(requires("read"))
) -> list[dict]:
    """Every decision on a check, newest first."""
    web = request.app.state.web

    def read(session) -> list[dict]:
        check = _check_or_404(web, session, check_id, who)
        return [_decision_out(row) for row in reviews.decisions_of(session, check.id, tenant_id=check.tenant_id)]

    return web.reads.run(request, read)


def _check_or_404(web, session, check_id: str, who: Principal):
    """The check, if `who` may read it; another tenant's is not found, as a missing one is: the same one query
    (narrowed by the tenant), the same answer, so no reply tells whether another tenant's check exists."""
    tenant_id = who.tenant_scope()
    row = web.ledger.get_check(session, check_id, tenant_id=tenant_id) if len(check_id) <= 36 else None
    if row is None:
        raise HttpError(404, "check.not_found", "No check has that id.")
    return row


def _decision_out(row) -> dict:
    fields = ("id", "check_id", "label", "reviewer", "note")
    return {**{name: getattr(row, name) for name in fields}, "decided_at": as_time(row.decided_at)}


@router.get("/versions", response_model=list[VersionOut], tags=["versions"], responses=_ERRORS)
def list_versions(
    request: Request, who: Principal = Depends(requires("read")), tenant: TenantQuery = None
) -> list[dict]:
    """Registered versions: the deployment's active one, and the one the tenant is pinned to, if any (`pinned`):
    the key's own tenant, or for an operator key the `tenant` asked for."""
    web = request.app.state.web
    scope = who.tenant_scope(tenant)

    def read(session) -> list[dict]:
        active = web.ledger.active_version(session)
        row = tenants.get_tenant(session, scope) if scope is not None else None
        pinned = row.pipeline_version_id if row is not None else None
        return [
            _version_out(version, active is not None and version.id == active.id, version.id == pinned)
            for version in web.ledger.versions(session)
        ]

    return web.reads.run(request, read)


def _version_out(row, active: bool, pinned: bool = False) -> dict:
    stages = {name: getattr(row, name) for name in ("id", "profile", "caption", "ground", "embed", "head")}
    times = {"created_at": as_time(row.created_at), "activated_at": as_time(row.activated_at)}
    return {**stages, **times, "active": active, "pinned": pinned}


def encode_cursor(row) -> str:
    raw = json.dumps([row.created_at.isoformat(), row.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str | None) -> tuple[datetime, str] | None:
    if cursor is None:
        return None
    try:
        moment, check_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return as_utc(datetime.fromisoformat(moment)), str(check_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise HttpError(422, "cursor.invalid", "That cursor is not one this API gave out.") from None


def as_utc(moment: datetime | None) -> datetime | None:
    """A time a client gave, in UTC: one without a zone is taken as UTC."""
    if moment is None:
        return None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
