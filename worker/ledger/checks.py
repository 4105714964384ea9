"""Creating checks, safely repeated, and reading them back by key.

The intake may file the same upload twice (Redis redelivers, a platform resends), so a check's key (external
id, version) is claimed in `check_keys` with INSERT ... ON CONFLICT DO NOTHING and the check read back: whoever
files it, there is one row, and callers learn whether their call made it. Re-scores file their checks the same
way, from the same row shape (`queued_check`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger.models import (
    DEFAULT_TENANT,
    CheckKeyRow,
    CheckRow,
    DeliveryRow,
    created_at_of,
    new_check_id,
    utcnow,
)
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
    tenant_id: str = DEFAULT_TENANT,
) -> tuple[CheckRow, bool]:
    """The check for (tenant, external_id, version), and whether this call created it (see `create_checks`)."""
    new = NewCheck(external_id, source, callback_url)
    return create_checks(session, pipeline_version_id, [new], tenant_id=tenant_id)[0]


def create_checks(
    session: Session, pipeline_version_id: str, new: list[NewCheck], *, tenant_id: str = DEFAULT_TENANT
) -> list[tuple[CheckRow, bool]]:
    """The check of each (external_id, version) of one tenant, and whether this call created it: a few statements
    per IN_CHUNK checks (see `file_rows`), however many. An external id given twice is created once; the same
    external id of another tenant is another check."""
    for one in new:
        if len(one.external_id) > _MAX_EXTERNAL_ID:  # PostgreSQL would refuse it and SQLite keep it
            raise ValueError(f"external_id is {len(one.external_id)} characters; the limit is {_MAX_EXTERNAL_ID}")
    now = utcnow()
    first = list({one.external_id: one for one in reversed(new)}.values())  # the first of each id wins
    rows = [
        queued_check(
            now, external_id=one.external_id, pipeline_version_id=pipeline_version_id, source=one.source,
            callback_url=one.callback_url, tenant_id=tenant_id,
        )
        for one in first
    ]  # fmt: skip
    found, created = file_rows(session, pipeline_version_id, rows, tenant_id=tenant_id)
    answers = []
    for one in new:
        answers.append((found[one.external_id], one.external_id in created))
        created.discard(one.external_id)  # the same id again later in `new`: not created twice
    return answers


def file_rows(
    session: Session, pipeline_version_id: str, rows: list[dict], *, tenant_id: str = DEFAULT_TENANT
) -> tuple[dict[str, CheckRow], set[str]]:
    """Files new checks (`queued_check` rows of one version and tenant) unless their external id has one already
    for that tenant: the check of each external id, and the external ids this call created.

    Race-safe without locks: a key is claimed in `check_keys` with INSERT ... ON CONFLICT DO NOTHING before its
    check is inserted, so of two concurrent filers one wins and the other's insert waits for it, then reads the
    winner's key. Keys are unique per day (the table is partitioned by day), so the filer first looks for the
    key on every day kept; two filers of one id on either side of midnight UTC, at the same instant, could
    both win (one check each), which no platform's retry timing meets in practice.
    """
    found, created = {}, set()
    for chunk in in_chunks(rows):
        if any(row.setdefault("tenant_id", tenant_id) != tenant_id for row in chunk):
            raise ValueError(f"file_rows files checks of one tenant ({tenant_id}) at a time")
        known = _keys(session, tenant_id, pipeline_version_id, [row["external_id"] for row in chunk])
        new = [row for row in chunk if row["external_id"] not in known]
        won = _claim_keys(session, tenant_id, pipeline_version_id, new)
        if won:
            session.execute(sa.insert(CheckRow), [row for row in new if row["external_id"] in won])
            created |= won
        lost = [row["external_id"] for row in new if row["external_id"] not in won]
        if lost:  # a concurrent filer committed these keys while this insert waited
            known |= _keys(session, tenant_id, pipeline_version_id, lost)
        known |= {row["external_id"]: row["id"] for row in new if row["external_id"] in won}
        by_id = {row.id: row for row in checks_by_id(session, list(known.values()))}
        for external_id, check_id in known.items():
            if check_id not in by_id:  # cannot happen while keys are kept no longer than checks
                raise RuntimeError(f"check {external_id!r} under {pipeline_version_id} has a key but no row")
            found[external_id] = by_id[check_id]
    return found, created


def _keys(session: Session, tenant_id: str, pipeline_version_id: str, external_ids: list[str]) -> dict[str, str]:
    """{external id: check id} of a tenant's keys kept for these ids (the earliest, should two days hold one)."""
    if not external_ids:
        return {}
    query = (
        sa.select(CheckKeyRow.external_id, CheckKeyRow.check_id)
        .where(
            CheckKeyRow.tenant_id == tenant_id,
            CheckKeyRow.pipeline_version_id == pipeline_version_id,
            CheckKeyRow.external_id.in_(external_ids),
        )
        .order_by(CheckKeyRow.day.desc())
    )
    return dict(session.execute(query).tuples().all())


def _claim_keys(session: Session, tenant_id: str, pipeline_version_id: str, rows: list[dict]) -> set[str]:
    """Inserts the keys of `rows` for today; returns the external ids whose key this call inserted."""
    if not rows:
        return set()
    day = rows[0]["created_at"].astimezone(UTC).date()
    keys = [
        {
            "external_id": row["external_id"],
            "tenant_id": tenant_id,
            "pipeline_version_id": pipeline_version_id,
            "day": day,
            "check_id": row["id"],
        }
        for row in rows
    ]
    statement = dialect_insert(session, CheckKeyRow).on_conflict_do_nothing().returning(CheckKeyRow.external_id)
    return set(session.scalars(statement, keys))  # one executemany: see `insert_many`


REPLACEABLE = (CheckStatus.rejected, CheckStatus.failed)  # ended without a result: a resubmission may replace it
_RESULT_COLUMNS = (
    "image_sha256", "error_code", "error_message", "p_fake", "verdict", "verdict_reason", "threshold",
    "threshold_low", "object_count", "caption", "objects", "timings_ms", "attribution", "provenance", "media",
    "reused_from", "match", "started_at", "finished_at", "lease_owner", "lease_token", "lease_expires_at",
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
            enqueued_at=now,
            available_at=now,
            updated_at=now,
        )
    )
    if session.execute(statement).rowcount != 1:
        return None
    session.execute(sa.delete(DeliveryRow).where(DeliveryRow.check_id == check_id))
    return get_check(session, check_id)


def get_check(session: Session, check_id: str, *, tenant_id: str | None = None) -> CheckRow | None:
    """The check `check_id`; with `tenant_id`, only if it is that tenant's (another's reads as none at all)."""
    query = sa.select(CheckRow).where(CheckRow.id == check_id, *made_at([check_id]))
    if tenant_id is not None:
        query = query.where(CheckRow.tenant_id == tenant_id)
    return session.scalars(fresh(query)).one_or_none()


def find_check(
    session: Session, external_id: str, pipeline_version_id: str, *, tenant_id: str = DEFAULT_TENANT
) -> CheckRow | None:
    """A tenant's check of an external id under a version: the one its key names while the key is kept, else the
    latest check filed under it."""
    check_id = _keys(session, tenant_id, pipeline_version_id, [external_id]).get(external_id)
    if check_id is not None:
        return get_check(session, check_id)
    query = (
        sa.select(CheckRow)
        .where(
            CheckRow.tenant_id == tenant_id,
            CheckRow.external_id == external_id,
            CheckRow.pipeline_version_id == pipeline_version_id,
        )
        .order_by(CheckRow.created_at.desc())
        .limit(1)
    )
    return session.scalars(fresh(query)).one_or_none()


def checks_by_id(session: Session, check_ids: list[str]) -> list[CheckRow]:
    rows = []
    for chunk in in_chunks(check_ids):
        rows += session.scalars(fresh(sa.select(CheckRow).where(CheckRow.id.in_(chunk), *made_at(chunk))))
    return rows


def made_at(check_ids: list[str]) -> list[sa.ColumnElement[bool]]:
    """A condition on `created_at` that the ids imply, when all are UUIDv7 (see `new_check_id`): PostgreSQL then
    reads only the days' partitions that hold them instead of probing every day's index."""
    moments = [created_at_of(check_id) for check_id in check_ids]
    if not moments or None in moments:
        return []
    return [CheckRow.created_at.in_(sorted(set(moments)))]


def queued_check(now: datetime, **fields) -> dict:
    """The row of a new check, queued now; `fields` names its upload, version and source (and re-score lineage).

    Its id is a UUIDv7 of its creation time, and `created_at` that time to the millisecond, so the id tells
    which day's partition holds the check (`made_at`).
    """
    created = now.replace(microsecond=now.microsecond // 1000 * 1000)
    return {
        "id": new_check_id(created),
        "status": CheckStatus.queued,
        "attempts": 0,
        "created_at": created,
        "enqueued_at": now,
        "available_at": now,
        "updated_at": now,
        **fields,
    }
