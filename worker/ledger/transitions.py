"""How a claimed check ends: done, rejected, failed, or queued again for a retry, each only under the lease
that holds it.

Every change is a conditional UPDATE that names the lease token (or, for the intake and the reconciler, a status
test), checked by the database in the same statement: two workers finishing the same check cannot both win, and
a worker that lost its lease changes nothing. A batch's changes go as one UPDATE ... FROM (VALUES ...) per shape
of row on PostgreSQL. Every check that ends is counted in the rollups in the same transaction (`_transition`,
`_transition_many`; see `worker.ledger.rollups`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger import review_queue
from worker.ledger.checks import made_at
from worker.ledger.claims import held, status_is
from worker.ledger.models import CheckRow, utcnow
from worker.ledger.queries import fresh, in_chunks
from worker.ledger.rollups import count_endings
from worker.ledger.states import CheckStatus


@dataclass(frozen=True)
class Ending:
    """How a check held by a lease ends when it cannot be scored: `status` rejected or failed, or queued again
    for a retry no earlier than `available_at`."""

    status: CheckStatus
    code: str | None  # None: a retry keeps the error already stored
    message: str | None
    available_at: datetime | None = None  # a retry only

    def values(self) -> dict:
        if self.status != CheckStatus.queued:
            return _ended_with_error(self.status, self.code, self.message)
        values = {"status": CheckStatus.queued, "enqueued_at": utcnow(), "available_at": self.available_at}
        values["lease_expires_at"] = None
        if self.code is not None:
            values |= {"error_code": self.code, "error_message": self.message}
        return values


def mark_queued(
    session: Session,
    check_id: str,
    token: str,
    *,
    available_at: datetime,
    error_code: str | None = None,
    error_message: str | None = None,
) -> CheckRow | None:
    """Back to queued for a retry, not claimable before `available_at`, recording why (an error left as None
    keeps the one already stored). Only the holder of the lease `token` can do it."""
    retry = Ending(CheckStatus.queued, error_code, error_message, available_at)
    return _one(end_many(session, token, {check_id: retry}))


def finish_done(
    session: Session,
    check_id: str,
    token: str,
    *,
    image_sha256: str | None,
    p_fake: float,
    verdict: str,
    threshold: float,
    threshold_low: float | None = None,
    caption: str | None,
    objects: list[dict],
    object_count: int,
    timings_ms: dict | None,
    verdict_reason: str | None = "score",
    attribution: list[dict] | None = None,
    provenance: dict | None = None,
) -> CheckRow | None:
    """Stores the result if the lease `token` still holds the check; returns the finished row, else None.

    A worker that lost its lease (it stalled past it, and another took over) changes nothing. A retry's error
    is cleared: a done check's error columns would only mislead.
    """
    result = {
        "image_sha256": image_sha256,
        "p_fake": p_fake,
        "verdict": verdict,
        "threshold": threshold,
        "threshold_low": threshold_low,
        "caption": caption,
        "objects": objects,
        "object_count": object_count,
        "timings_ms": timings_ms,
        "verdict_reason": verdict_reason,
        "attribution": attribution,
        "provenance": provenance,
    }
    return _one(finish_done_many(session, token, {check_id: result}))


def finish_done_many(
    session: Session, token: str, results: dict[str, dict], *, review_double_share: float = review_queue.DOUBLE_SHARE
) -> list[CheckRow]:
    """`finish_done` for a batch, {check id: result}, in one statement; returns the rows this lease finished. The
    uncertain and fake ones enter the moderators' review queue in the same transaction (`review_queue.enqueue`)."""
    now = utcnow()
    ended = {"status": CheckStatus.done, "error_code": None, "error_message": None, "finished_at": now}
    rows = [{"id": check_id, **result, **ended, "lease_expires_at": None} for check_id, result in results.items()]
    done = _transition_many(session, held(token), rows)
    review_queue.enqueue(session, done, review_double_share)
    return done


def end_many(session: Session, token: str, endings: dict[str, Ending]) -> list[CheckRow]:
    """Ends checks with an error or sends them back for a retry, {check id: ending}, in one statement per
    shape (ended, retried); returns the rows this lease changed. See `finish_rejected` and `mark_queued`."""
    rows = [{"id": check_id, **ending.values()} for check_id, ending in endings.items()]
    return _transition_many(session, held(token), rows)


def finish_rejected(
    session: Session, check_id: str, code: str, message: str, token: str | None = None
) -> CheckRow | None:
    """The input can never succeed (not an image, too large, refused URL). With `token`, only the holder of
    that lease can; without, only while the check was never claimed (the intake rejecting what it filed)."""
    return _finish_with_error(session, check_id, CheckStatus.rejected, code, message, token)


def finish_failed(session: Session, check_id: str, code: str, message: str, token: str) -> CheckRow | None:
    """Retries are used up; only the holder of the lease `token` can record it."""
    return _finish_with_error(session, check_id, CheckStatus.failed, code, message, token)


def _finish_with_error(
    session: Session, check_id: str, status: CheckStatus, code: str, message: str, token: str | None
) -> CheckRow | None:
    if token is not None:
        return _one(end_many(session, token, {check_id: Ending(status, code, message)}))
    return _transition(session, check_id, _never_claimed(), _ended_with_error(status, code, message))


def abandoned_checks(session: Session, max_attempts: int, limit: int = 500) -> list[CheckRow]:
    """Running checks whose lease expired with every attempt used: each time, the worker died on them."""
    query = (
        sa.select(CheckRow)
        .where(_abandoned(max_attempts))
        .order_by(CheckRow.lease_expires_at, CheckRow.id)
        .limit(limit)
    )
    return list(session.scalars(fresh(query)))


def fail_abandoned(session: Session, check_id: str, max_attempts: int, code: str, message: str) -> CheckRow | None:
    """Fails an abandoned check (see `abandoned_checks`) unless a worker took it meanwhile."""
    values = _ended_with_error(CheckStatus.failed, code, message)
    return _transition(session, check_id, _abandoned(max_attempts), values)


def _ended_with_error(status: CheckStatus, code: str, message: str) -> dict:
    return {
        "status": status,
        "error_code": code,
        "error_message": message,
        "finished_at": utcnow(),
        "lease_expires_at": None,
    }


def _never_claimed() -> sa.ColumnElement[bool]:
    return sa.and_(CheckRow.status == CheckStatus.queued, CheckRow.lease_token.is_(None))


def _abandoned(max_attempts: int) -> sa.ColumnElement[bool]:
    return sa.and_(
        status_is(CheckStatus.running),  # the reconciler's scan reads `ix_checks_claim_running`
        CheckRow.lease_expires_at < utcnow(),
        CheckRow.attempts >= max_attempts,
    )


def _transition(session: Session, check_id: str, condition: sa.ColumnElement[bool], values: dict) -> CheckRow | None:
    """One conditional UPDATE: applies `values` only while the check meets `condition` (a status test), and
    counts the check's ending, if it ended.

    The condition is checked by the database in the same statement, so two workers finishing the same check
    cannot both win; the loser gets None and changes nothing (and counts nothing).
    """
    row = _update_one(session, check_id, condition, values)
    count_endings(session, [row] if row is not None else [])
    return row


def _update_one(session: Session, check_id: str, condition: sa.ColumnElement[bool], values: dict) -> CheckRow | None:
    statement = (
        sa.update(CheckRow)
        .where(CheckRow.id == check_id, condition, *made_at([check_id]))
        .values(**values, updated_at=utcnow())
        .returning(CheckRow)
        .execution_options(populate_existing=True)
    )
    return session.scalars(statement).one_or_none()


def _transition_many(session: Session, condition: sa.ColumnElement[bool], rows: list[dict]) -> list[CheckRow]:
    """`_transition` for many checks, each row {"id", column: value...}: on PostgreSQL one UPDATE ... FROM
    (VALUES ...) per shape of row (the same columns) and per IN_CHUNK rows, whatever the batch size; the endings
    are counted once for the whole batch."""
    changed = _update_many(session, condition, rows)
    count_endings(session, changed)
    return changed


def _update_many(session: Session, condition: sa.ColumnElement[bool], rows: list[dict]) -> list[CheckRow]:
    if not rows:
        return []
    if session.get_bind().dialect.name != "postgresql":  # a local file: a statement costs no round trip
        changed = (_update_one(session, row["id"], condition, _without_id(row)) for row in rows)
        return [row for row in changed if row is not None]
    shapes: dict[tuple[str, ...], list[dict]] = {}
    for row in rows:
        shapes.setdefault(tuple(row), []).append(row)
    return [
        changed
        for columns, same in shapes.items()
        for chunk in in_chunks(same)
        for changed in _update_from_values(session, condition, columns, chunk)
    ]


def _update_from_values(
    session: Session, condition: sa.ColumnElement[bool], columns: tuple[str, ...], rows: list[dict]
) -> list[CheckRow]:
    table = CheckRow.__table__
    incoming = sa.values(*(sa.column(name, table.c[name].type) for name in columns), name="incoming").data(
        [tuple(row[name] for name in columns) for row in rows]
    )
    # A VALUES list has no column types of its own: each value is cast to the type of the column it sets.
    assignments = {name: sa.cast(incoming.c[name], table.c[name].type) for name in columns if name != "id"}
    statement = (
        sa.update(CheckRow)
        .where(CheckRow.id == incoming.c.id, condition, *made_at([row["id"] for row in rows]))
        .values(**assignments, updated_at=utcnow())
        .returning(CheckRow)
        .execution_options(populate_existing=True, synchronize_session=False)
    )
    return list(session.scalars(statement))


def _without_id(row: dict) -> dict:
    return {name: value for name, value in row.items() if name != "id"}


def _one(rows: list[CheckRow]) -> CheckRow | None:
    return rows[0] if rows else None
