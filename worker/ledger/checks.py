"""Creating checks, safely repeated, and reading them back by key.

The intake may file the same upload twice (Redis redelivers, a platform resends), so a check is created with
INSERT ... ON CONFLICT DO NOTHING on (external id, version) and then read back: whoever files it, there is one
row, and callers learn whether their call made it. Re-scores create their checks from the same row shape
(`queued_check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger.models import CheckRow, DeliveryRow, new_id, utcnow
from worker.ledger.queries import dialect_insert, fresh, in_chunks
from worker.ledger.states import CheckStatus


@dataclass(frozen=True)
class NewCheck:
    """A check to create: a platform's id for an image, where its bytes are, and where to send its result."""

    external_id: str
    source: dict
    callback_url: str | None = None


_MAX_EXTERNAL_ID = CheckRow.__table__.c.external_id.type.length


def create_check(
    session: Session,
    *,
    external_id: str,
    pipeline_version_id: str,
    source: dict,
    callback_url: str | None = None,
) -> tuple[CheckRow, bool]:
    """The check for (external_id, version), and whether this call created it (see `create_checks`)."""
    new = NewCheck(external_id, source, callback_url)
    return create_checks(session, pipeline_version_id, [new])[0]


def create_checks(session: Session, pipeline_version_id: str, new: list[NewCheck]) -> list[tuple[CheckRow, bool]]:
    """The check of each (external_id, version), and whether this call created it: two statements (an INSERT
    and a SELECT per IN_CHUNK checks), however many.

    Race-safe without locks: of two concurrent inserts, one wins and the other's ON CONFLICT DO NOTHING
    waits for it, then the SELECT reads the winner's row. An external id given twice is created once.
    """
    for one in new:
        if len(one.external_id) > _MAX_EXTERNAL_ID:  # PostgreSQL would refuse it and SQLite keep it
            raise ValueError(f"external_id is {len(one.external_id)} characters; the limit is {_MAX_EXTERNAL_ID}")
    now, created, rows = utcnow(), set(), {}
    first = list({one.external_id: one for one in reversed(new)}.values())  # the first of each id wins
    for chunk in in_chunks(first):
        values = [
            queued_check(
                now, external_id=one.external_id, pipeline_version_id=pipeline_version_id, source=one.source,
                callback_url=one.callback_url,
            )
            for one in chunk
        ]  # fmt: skip
        statement = (
            dialect_insert(session, CheckRow)
            .on_conflict_do_nothing(index_elements=["external_id", "pipeline_version_id"])
            .returning(CheckRow.external_id)
        )
        created.update(session.scalars(statement, values))  # one executemany: see `insert_many`
        query = sa.select(CheckRow).where(
            CheckRow.pipeline_version_id == pipeline_version_id,
            CheckRow.external_id.in_([one.external_id for one in chunk]),
        )
        rows.update({row.external_id: row for row in session.scalars(fresh(query))})
    answers = []
    for one in new:
        if one.external_id not in rows:  # cannot happen: inserted, or conflicted with a committed row
            raise RuntimeError(f"check {one.external_id!r} under {pipeline_version_id} vanished after insert")
        answers.append((rows[one.external_id], one.external_id in created))
        created.discard(one.external_id)  # the same id again later in `new`: not created twice
    return answers


REPLACEABLE = (CheckStatus.rejected, CheckStatus.failed)  # ended without a result: a resubmission may replace it
_RESULT_COLUMNS = (
    "image_sha256", "error_code", "error_message", "p_fake", "verdict", "verdict_reason", "threshold",
    "threshold_low", "object_count", "caption", "objects", "timings_ms", "attribution", "provenance", "started_at",
    "finished_at", "lease_owner", "lease_token", "lease_expires_at",
)  # fmt: skip


def replace_check(session: Session, check_id: str, new: NewCheck) -> CheckRow | None:
    """A check that ended without a result (rejected, failed), made over for a corrected resubmission under its
    external id: the new source and callback, queued from scratch, its earlier deliveries dropped (the platform
    hears of the new outcome instead). None if it is no longer rejected or failed (another filer replaced it)."""
    now = utcnow()
    statement = (
        sa.update(CheckRow)
        .where(CheckRow.id == check_id, CheckRow.status.in_(REPLACEABLE))
        .values(
            **dict.fromkeys(_RESULT_COLUMNS),
            source=new.source,
            callback_url=new.callback_url,
            status=CheckStatus.queued,
            attempts=0,
            created_at=now,
            enqueued_at=now,
            available_at=now,
            updated_at=now,
        )
    )
    if session.execute(statement).rowcount != 1:
        return None
    session.execute(sa.delete(DeliveryRow).where(DeliveryRow.check_id == check_id))
    return get_check(session, check_id)


def get_check(session: Session, check_id: str) -> CheckRow | None:
    return session.scalars(fresh(sa.select(CheckRow).where(CheckRow.id == check_id))).one_or_none()


def find_check(session: Session, external_id: str, pipeline_version_id: str) -> CheckRow | None:
    query = sa.select(CheckRow).where(
        CheckRow.external_id == external_id, CheckRow.pipeline_version_id == pipeline_version_id
    )
    return session.scalars(fresh(query)).one_or_none()


def checks_by_id(session: Session, check_ids: list[str]) -> list[CheckRow]:
    rows = []
    for chunk in in_chunks(check_ids):
        rows += session.scalars(fresh(sa.select(CheckRow).where(CheckRow.id.in_(chunk))))
    return rows


def queued_check(now: datetime, **fields) -> dict:
    """The row of a new check, queued now; `fields` names its upload, version and source (and re-score lineage)."""
    return {
        "id": new_id(),
        "status": CheckStatus.queued,
        "attempts": 0,
        "created_at": now,
        "enqueued_at": now,
        "available_at": now,
        "updated_at": now,
        **fields,
    }
