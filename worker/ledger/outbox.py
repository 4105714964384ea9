"""The outbox: results waiting to be pushed to platforms (callbacks, the results stream), as ledger rows.

When a check ends (done, rejected or failed), `record_outcome` writes one `deliveries` row per target in the
same transaction as the outcome, so a stored result always has its deliveries. Senders (`worker.outbox.delivery`)
claim due rows with a lease, send, and record each attempt here.
"""

from __future__ import annotations

import json
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger.models import CheckRow, DeliveryRow, new_id, utcnow
from worker.ledger.queries import claim_rows, dialect_insert, fresh
from worker.ledger.states import STREAM_TARGET, DeliveryStatus
from worker.ledger.views import check_dict

EVENT = "check.finished"


def record_outcome(session: Session, check: CheckRow, *, results_stream: bool) -> int:
    """Queues the finished check's result for its callback URL and, with `results_stream`, the stream, in the
    caller's transaction.

    Returns how many deliveries were added; a check that ends twice (it cannot, but a retried transaction might
    try) adds none the second time.
    """
    return record_outcomes(session, [check], results_stream=results_stream)


def record_outcomes(session: Session, checks: list[CheckRow], *, results_stream: bool) -> int:
    """`record_outcome` for a batch of finished checks: one INSERT whatever their number (up to 1,000)."""
    now = utcnow()
    rows = [
        {
            "id": new_id(),
            "check_id": check.id,
            "check_created_at": check.created_at,
            "tenant_id": check.tenant_id,  # whose secret signs it (worker.outbox.delivery)
            "target": target,
            "status": DeliveryStatus.pending,
            "attempts": 0,
            "body": result_body(check),
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for check in checks
        for target in _targets(check, results_stream)
    ]
    if not rows:
        return 0
    statement = (
        dialect_insert(session, DeliveryRow)
        .on_conflict_do_nothing(index_elements=["check_id", "target", "check_created_at"])
        .returning(DeliveryRow.id)
    )
    return len(session.execute(statement, rows).all())  # one executemany, sent as multi-row VALUES pages


def _targets(check: CheckRow, results_stream: bool) -> list[str]:
    return [check.callback_url] * bool(check.callback_url) + [STREAM_TARGET] * results_stream


def result_body(check: CheckRow) -> dict:
    """What every target receives: the check as platforms read it everywhere else."""
    return {"event": EVENT, "check": json.loads(json.dumps(check_dict(check)))}  # plain JSON types only


def claim_due(session: Session, limit: int, lease: timedelta) -> list[DeliveryRow]:
    """Takes up to `limit` pending deliveries that are due: attempts + 1, hidden from others for `lease`.

    The lease replaces a status: a sender that dies leaves its rows to come due again when it ends. Rows
    another sender is claiming are skipped (see `claim_rows`), so no two senders take the same row.
    """
    now = utcnow()
    return claim_rows(
        session,
        DeliveryRow,
        claimable=sa.and_(DeliveryRow.status == DeliveryStatus.pending, DeliveryRow.next_attempt_at <= now),
        order_by=[DeliveryRow.next_attempt_at],
        limit=limit,
        values={"next_attempt_at": now + lease, "attempts": DeliveryRow.attempts + 1, "updated_at": now},
    )


def record_attempt(session: Session, claimed: DeliveryRow, values: dict) -> bool:
    """Writes an attempt's outcome unless the row moved on meanwhile (its lease ran out and it was re-claimed)."""
    statement = (
        sa.update(DeliveryRow)
        .where(
            DeliveryRow.id == claimed.id,
            DeliveryRow.status == DeliveryStatus.pending,
            DeliveryRow.attempts == claimed.attempts,
        )
        .values(**values, updated_at=utcnow())
    )
    return session.execute(statement).rowcount == 1


def list_deliveries(
    session: Session, *, status: str | None = None, limit: int = 100, tenant_id: str | None = None
) -> list[DeliveryRow]:
    """Deliveries newest first, optionally of one status and one tenant."""
    query = sa.select(DeliveryRow).order_by(DeliveryRow.created_at.desc(), DeliveryRow.id.desc()).limit(limit)
    if tenant_id is not None:
        query = query.where(DeliveryRow.tenant_id == tenant_id)
    if status is not None:
        query = query.where(DeliveryRow.status == DeliveryStatus(status))
    return list(session.scalars(fresh(query)))


def retry_failed(session: Session, ids: list[str] | None = None) -> list[str]:
    """Failed deliveries (all, or those of `ids`) back to pending, attempts reset, due now; returns their ids."""
    condition = DeliveryRow.status == DeliveryStatus.failed
    if ids is not None:
        condition = sa.and_(condition, DeliveryRow.id.in_(ids))
    now = utcnow()
    statement = (
        sa.update(DeliveryRow)
        .where(condition)
        .values(status=DeliveryStatus.pending, attempts=0, next_attempt_at=now, updated_at=now)
        .returning(DeliveryRow.id)
    )
    return list(session.scalars(statement))
