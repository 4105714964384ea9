"""Intake: every submission becomes a ledger row (blob stored, `queued`) in milliseconds, running no model.

Submissions come from `item submit` and the Python client (which write here directly) and from `item.check`
messages of any client (read by `worker.intake.consumer`, which acknowledges a message only after this has committed
its row). Workers then claim the rows from the ledger; no message is needed to find a check again.

What cannot be filed keeps a record with a stable code: a submission whose `external_id` is usable gets a
`rejected` row (bad source, unknown argument, bad callback URL); a message without one, or one that is not an
`item.check` at all, becomes a dead letter (`item deadletters`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy.orm import Session

from pipeline.core.errors import ItemError
from worker.intake import text
from worker.intake.quotas import BacklogFull, QuotaExceeded, Quotas
from worker.ledger import outbox, tenants
from worker.ledger.checks import REPLACEABLE
from worker.ledger.models import DEFAULT_TENANT, CheckRow, DeadLetterRow
from worker.ledger.states import CheckStatus
from worker.ledger.store import Ledger, NewCheck
from worker.ledger.wakeups import notify_new_checks
from worker.ops import metrics
from worker.outbox.callbacks import CallbackError, checked_callback_url
from worker.settings import CHECK_TASK, Settings
from worker.sources import kinds as sources

log = logging.getLogger("item.intake")

MAX_EXTERNAL_ID = CheckRow.__table__.c.external_id.type.length
DEAD_LETTER_BODY_CHARS = 65_536  # of a dead letter's raw body: enough to see what was sent, not a way to fill a disk
REASON_CHARS = 2_000  # of a stored reason or error message (an exception's text can quote any input)
TASK_ARGUMENTS = frozenset({"external_id", "image", "callback_url"})


class MessageError(ItemError):
    """A message that is not a well-formed `item.check`. Permanent."""

    code = "message.invalid"


class CheckConflict(ItemError):
    """The external id already names a check of another image that is queued, running or done under this
    version: answering with that check would give the old image's result for the new one. Permanent."""

    code = "check.conflict"


@dataclass(frozen=True)
class CheckRequest:
    """One check asked for (a submission, a message): the task's keyword arguments, not yet trusted."""

    external_id: str
    image: Any
    callback_url: Any = None
    problem: ItemError | None = None  # already known to be unfileable (an unknown argument, say)


@dataclass
class Filed:
    check: CheckRow | None  # None only when `refused`
    created: bool  # False: this external id was already filed under this version (a redelivered message)
    rejected: ItemError | None = None  # filed, and rejected at once
    conflict: CheckConflict | None = None  # not filed: the id names another image's check (`check`)
    refused: QuotaExceeded | None = None  # not filed: over the tenant's quota (`over_quota="refuse"`; HTTP 429)


@dataclass
class Intake:
    """Files submissions under the active pipeline version; metrics and logs only once the rows are committed."""

    settings: Settings
    ledger: Ledger
    quotas: Quotas = field(init=False)

    def __post_init__(self) -> None:
        self.quotas = Quotas(self.settings)

    def file(
        self,
        submissions: list[CheckRequest],
        dead: list[DeadLetterRow] = (),
        *,
        version_id: str | None = None,
        conflicts_dead: bool = False,
        tenant_id: str = DEFAULT_TENANT,
        over_quota: Literal["reject", "refuse"] = "reject",
    ) -> list[Filed]:
        """One transaction: a row for each submission (and each dead letter); then metrics and logs.

        A few statements whatever the number of submissions: their blobs in one, their checks in two (see
        `Ledger.create_checks`). Filed under `version_id`, by default the active version (the embedded mode
        names its own). A submission that conflicts with the check its external id names (`Filed.conflict`) is
        not filed; with `conflicts_dead` (the broker's intake, which has no one to answer) it is kept as a dead
        letter `check.conflict`.

        Every submission is `tenant_id`'s: its external id is looked up among that tenant's checks only, and its
        version is the one the tenant is pinned to, if any (`item tenants pin`).

        The tenant's quota (worker.intake.quotas) admits the first valid submissions it has room for; each of the
        others is, with `over_quota="reject"` (the broker, `item submit`), filed `rejected` with `quota.exceeded`
        or `quota.backlog` like any refused message, or with `"refuse"` (HTTP) not filed at all (`Filed.refused`).
        """
        dead = list(dead)
        with self.ledger.session() as session:
            if submissions:  # dead letters belong to no version, and are kept before any is registered
                version_id = self.version_for(session, tenant_id, version_id)
            filed: list[Filed | None] = [None] * len(submissions)
            blobs: dict[str, bytes] = {}
            valid: list[tuple[int, NewCheck, dict[str, bytes]]] = []
            for index, submission in enumerate(submissions):
                try:
                    own: dict[str, bytes] = {}
                    valid.append((index, self._checked(submission, own), own))
                except ItemError as error:
                    filed[index] = self._file_rejected(session, version_id, submission, error, tenant_id)
            admission = self.quotas.admit(session, tenant_id, len(valid))
            for index, new, _ in valid[admission.admitted :]:
                if over_quota == "refuse":
                    filed[index] = Filed(None, False, refused=admission.refused)
                else:
                    filed[index] = self._file_over_quota(session, version_id, new, admission.refused, tenant_id)
            for _, _, own in valid[: admission.admitted]:  # a refused check's bytes are not kept
                blobs.update(own)
            valid = [(index, new) for index, new, _ in valid[: admission.admitted]]
            self.ledger.put_blobs(session, blobs)
            created = self.ledger.create_checks(session, version_id, [new for _, new in valid], tenant_id=tenant_id)
            for (index, new), (check, is_new) in zip(valid, created, strict=True):
                filed[index] = Filed(check, True) if is_new else self._filed_before(session, check, new)
            if conflicts_dead:
                conflicts = [(sub, one.conflict) for sub, one in zip(submissions, filed, strict=True) if one.conflict]
                dead += [_conflict_letter(submission, conflict, tenant_id) for submission, conflict in conflicts]
            for letter in dead:
                session.add(letter)
            if any(one.created and one.rejected is None for one in filed):
                notify_new_checks(session, version_id)  # sent on commit: idle workers claim at once
        self._report(filed, dead, tenant_id, admission.asked - admission.admitted, admission.refused)
        return filed

    def version_for(self, session: Session, tenant_id: str = DEFAULT_TENANT, named: str | None = None) -> str:
        """The version a tenant's new checks are filed under: `named` (the embedded mode names its own), else the
        tenant's pinned one, else the deployment's active one. A disabled or unknown tenant files nothing, whatever
        the version (`tenant.disabled`, `tenant.unknown`)."""
        tenant = tenants.require_tenant(session, tenant_id)
        if tenant.disabled_at is not None:
            raise ItemError(f"Tenant {tenant_id!r} is disabled: it files no new checks.", code="tenant.disabled")
        if named is not None:
            return named
        if tenant.pipeline_version_id is not None:
            return tenant.pipeline_version_id
        version = self.ledger.active_version(session)
        if version is None:
            raise ItemError(
                "No pipeline version is registered yet: start a worker (`item worker`) once, so checks know which "
                "models and head will score them.",
                code="version.none",
            )
        return version.id

    def _checked(self, submission: CheckRequest, blobs: dict[str, bytes]) -> NewCheck:
        """The check a valid submission makes (its inline bytes put in `blobs`); raises why it is not valid."""
        if submission.problem is not None:
            raise submission.problem
        problem = text.strings_problem(submission.image, "image") or text.strings_problem(
            submission.callback_url, "callback_url"
        )
        if problem:
            raise MessageError(problem)
        callback_url = checked_callback_url(submission.callback_url)
        source = sources.to_stored(submission.image, self.settings, blobs.__setitem__)
        return NewCheck(submission.external_id, source, callback_url)

    def _filed_before(self, session: Session, check: CheckRow, new: NewCheck) -> Filed:
        """A submission under an external id already filed under this version: the same image again (a redelivery,
        a retry) is that check; a corrected resubmission replaces a check that ended without a result; another
        image under the id of a live or answered check is a conflict."""
        if check.source == new.source:
            return Filed(check, created=False)
        if check.status in REPLACEABLE:
            replaced = self.ledger.replace_check(session, check.id, new)
            if replaced is not None:
                log.info("check %s replaced by a resubmission of its external id", check.id,
                         extra={"check_id": check.id, "stage": "intake"})  # fmt: skip
                return Filed(replaced, created=True)
        return Filed(check, created=False, conflict=_conflict(check))

    def _file_rejected(
        self, session: Session, version_id: str, submission: CheckRequest, error: ItemError, tenant_id: str
    ) -> Filed:
        """Still a row: the platform can read why. A bad callback URL is not kept, a good one still hears of it."""
        callback = None if isinstance(error, CallbackError) else _usable_callback(submission.callback_url)
        check, created = self.ledger.create_check(
            session, external_id=submission.external_id, pipeline_version_id=version_id, source={"invalid": True},
            callback_url=callback, tenant_id=tenant_id,
        )  # fmt: skip
        if not created:  # never reject an earlier, valid check that happens to share the external id
            return Filed(check, False, conflict=None if check.status in REPLACEABLE else _conflict(check))
        error = type(error)(text.storable(error.message, REASON_CHARS), code=error.code)
        rejected = self.ledger.finish_rejected(session, check.id, error.code, error.message)
        outbox.record_outcome(session, rejected, results_stream=bool(self.settings.results_stream))
        return Filed(rejected, created=True, rejected=error)

    def _file_over_quota(
        self, session: Session, version_id: str, new: NewCheck, error: QuotaExceeded, tenant_id: str
    ) -> Filed:
        """A valid submission over the tenant's quota, as a `rejected` check with the quota's code (a statement or
        three each). Its external id filed before with the same image is that check (a redelivery is never
        refused); one that ended without a result is replaced by this rejection, so the platform hears of it."""
        refused = NewCheck(new.external_id, {"invalid": True}, new.callback_url)
        check, created = self.ledger.create_check(
            session, external_id=new.external_id, pipeline_version_id=version_id, source=refused.source,
            callback_url=new.callback_url, tenant_id=tenant_id,
        )  # fmt: skip
        if not created and check.source == new.source:
            return Filed(check, created=False)
        if not created and check.status in REPLACEABLE:
            check = self.ledger.replace_check(session, check.id, refused) or check
            created = check.status == CheckStatus.queued
        if not created:
            return Filed(check, False, conflict=_conflict(check))
        rejected = self.ledger.finish_rejected(session, check.id, error.code, error.message)
        outbox.record_outcome(session, rejected, results_stream=bool(self.settings.results_stream))
        return Filed(rejected, created=True, rejected=error)

    def _report(
        self, filed: list[Filed], dead: list[DeadLetterRow], tenant_id: str, refused: int, why: QuotaExceeded | None
    ) -> None:
        if refused:
            metrics.QUOTA_REFUSED.labels(tenant_id, "backlog" if isinstance(why, BacklogFull) else "rate").inc(refused)
        admitted = sum(1 for one in filed if one.created and one.rejected is None)
        if admitted:
            metrics.CHECKS_FILED.labels(tenant_id).inc(admitted)
        for one in filed:
            if one.rejected is not None:
                metrics.finished("rejected", one.rejected.code, one.check.created_at, tenant_id)
                about = {"check_id": one.check.id, "external_id": one.check.external_id, "code": one.rejected.code}
                log.info("check rejected at intake: %s", one.rejected.message, extra={**about, "stage": "intake"})
        for letter in dead:
            metrics.DEAD_LETTERS.labels(letter.code).inc()
            log.warning("dead letter %s: %s", letter.id, letter.reason, extra={"stage": "intake", "code": letter.code})


def _usable_callback(url: Any) -> str | None:
    if text.strings_problem(url, "callback_url"):
        return None
    try:
        return checked_callback_url(url)
    except CallbackError:
        return None


def _conflict_letter(submission: CheckRequest, conflict: CheckConflict, tenant_id: str) -> DeadLetterRow:
    asked = {"external_id": submission.external_id, "image": submission.image, "callback_url": submission.callback_url}
    letter = dead_letter(conflict.code, conflict.message, asked, None, CHECK_TASK)
    letter.tenant_id = tenant_id
    return letter


def _conflict(check: CheckRow) -> CheckConflict:
    status = getattr(check.status, "value", check.status)
    return CheckConflict(
        f"External id already names check {check.id} ({status}) of another image under this pipeline version; "
        "send the new image under a new external id."
    )


# ---------------------------------------------------------------------- messages


def from_message(
    body: Any, headers: dict | None, delivery_info: dict | None = None, raw: Any = None
) -> CheckRequest | DeadLetterRow:
    """What a decoded Celery message asks for: a submission, or a dead letter saying why it cannot be one.

    Both Celery protocols: version 2 names the task in the headers and carries `[args, kwargs, embed]`; version 1
    carries `{"task", "args", "kwargs"}`. Only keyword arguments are part of the task contract. A dead letter
    keeps `raw`, the body as it arrived.
    """
    queue = (delivery_info or {}).get("routing_key")
    kept = body if raw is None else raw
    task, args, kwargs = _task_call(body, headers or {})
    if task != CHECK_TASK:
        return dead_letter("message.unknown_task", f"Task {task!r} is not {CHECK_TASK!r}.", kept, queue, task)
    if not isinstance(kwargs, dict):
        return dead_letter("message.invalid", "The task's keyword arguments are not an object.", kept, queue, task)
    external_id = kwargs.get("external_id")
    problem = text.text_problem(external_id, "external_id", MAX_EXTERNAL_ID)
    if problem:
        return dead_letter("message.no_external_id", problem, kept, queue, task)
    unknown = sorted(set(kwargs) - TASK_ARGUMENTS)
    error = None
    if args:
        error = MessageError(f"{CHECK_TASK} takes keyword arguments only; {len(args)} positional given.")
    elif unknown:
        error = MessageError(f"Unknown arguments {unknown}; {CHECK_TASK} takes {sorted(TASK_ARGUMENTS)}.")
    return CheckRequest(external_id, kwargs.get("image"), kwargs.get("callback_url"), error)


def _task_call(body: Any, headers: dict) -> tuple[Any, Any, Any]:
    if "task" in headers:  # protocol 2
        if isinstance(body, list | tuple) and len(body) >= 2:
            return headers["task"], body[0], body[1]
        return headers["task"], None, None
    if isinstance(body, dict):  # protocol 1
        return body.get("task"), body.get("args") or [], body.get("kwargs", {})
    return None, None, None


def dead_letter(
    code: str, reason: str, body: Any, queue: str | None, task: Any = None, content_type: str | None = None
) -> DeadLetterRow:
    """A dead letter: everything it keeps is made storable (valid UTF-8, no NUL) and cut to its column."""
    return DeadLetterRow(
        code=code,
        reason=text.storable(reason, REASON_CHARS),
        queue=text.storable(queue, 255) if queue is not None else None,
        task=text.storable(task, 255) if task is not None else None,
        content_type=text.storable(content_type, 255) if content_type is not None else None,
        body=text.storable(body, DEAD_LETTER_BODY_CHARS),
    )
