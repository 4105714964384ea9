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
from dataclasses import dataclass
from typing import Any

from sqlalchemy.orm import Session

from pipeline.core.errors import ItemError
from worker.intake import text
from worker.ledger import outbox, tenants
from worker.ledger.checks import REPLACEABLE
from worker.ledger.models import DEFAULT_TENANT, CheckRow, DeadLetterRow
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
    check: CheckRow
    created: bool  # False: this external id was already filed under this version (a redelivered message)
    rejected: ItemError | None = None  # filed, and rejected at once
    conflict: CheckConflict | None = None  # not filed: the id names another image's check (`check`)


@dataclass
class Intake:
    """Files submissions under the active pipeline version; metrics and logs only once the rows are committed."""

    settings: Settings
    ledger: Ledger

    def file(
        self,
        submissions: list[CheckRequest],
        dead: list[DeadLetterRow] = (),
        *,
        version_id: str | None = None,
        conflicts_dead: bool = False,
        tenant_id: str = DEFAULT_TENANT,
    ) -> list[Filed]:
        """One transaction: a row for each submission (and each dead letter); then metrics and logs.

        A few statements whatever the number of submissions: their blobs in one, their checks in two (see
        `Ledger.create_checks`). Filed under `version_id`, by default the active version (the embedded mode
        names its own). A submission that conflicts with the check its external id names (`Filed.conflict`) is
        not filed; with `conflicts_dead` (the broker's intake, which has no one to answer) it is kept as a dead
        letter `check.conflict`.

        Every submission is `tenant_id`'s: its external id is looked up among that tenant's checks only, and its
        version is the one the tenant is pinned to, if any (`item tenants pin`).
        """
        dead = list(dead)
        with self.ledger.session() as session:
            if submissions:  # dead letters belong to no version, and are kept before any is registered
                version_id = version_id or self.active_version_id(session, tenant_id)
            filed: list[Filed | None] = [None] * len(submissions)
            blobs: dict[str, bytes] = {}
            valid: list[tuple[int, NewCheck]] = []
            for index, submission in enumerate(submissions):
                try:
                    valid.append((index, self._checked(submission, blobs)))
                except ItemError as error:
                    filed[index] = self._file_rejected(session, version_id, submission, error, tenant_id)
            self.ledger.put_blobs(session, blobs)
            created = self.ledger.create_checks(session, version_id, [new for _, new in valid], tenant_id=tenant_id)
            for (index, new), (check, is_new) in zip(valid, created, strict=True):
                filed[index] = Filed(check, True) if is_new else self._filed_before(session, check, new)
            if conflicts_dead:
                conflicts = [(sub, one.conflict) for sub, one in zip(submissions, filed, strict=True) if one.conflict]
                dead += [_conflict_letter(submission, conflict) for submission, conflict in conflicts]
            for letter in dead:
                session.add(letter)
            if any(one.created and one.rejected is None for one in filed):
                notify_new_checks(session, version_id)  # sent on commit: idle workers claim at once
        self._report(filed, dead)
        return filed

    def active_version_id(self, session: Session, tenant_id: str = DEFAULT_TENANT) -> str:
        """The version a tenant's new checks are filed under: its pinned one, else the deployment's active one.
        A disabled or unknown tenant files nothing (`tenant.disabled`, `tenant.unknown`)."""
        tenant = tenants.require_tenant(session, tenant_id)
        if tenant.disabled_at is not None:
            raise ItemError(f"Tenant {tenant_id!r} is disabled: it files no new checks.", code="tenant.disabled")
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

    def _report(self, filed: list[Filed], dead: list[DeadLetterRow]) -> None:
        for one in filed:
            if one.rejected is not None:
                metrics.finished("rejected", one.rejected.code, one.check.created_at)
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


def _conflict_letter(submission: CheckRequest, conflict: CheckConflict) -> DeadLetterRow:
    asked = {"external_id": submission.external_id, "image": submission.image, "callback_url": submission.callback_url}
    return dead_letter(conflict.code, conflict.message, asked, None, CHECK_TASK)


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
