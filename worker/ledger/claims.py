"""Claiming checks for a batch under a lease, renewing the lease, and giving unrun checks back (all of a batch
when its worker stops, or the few whose bytes are late to arrive).

A worker holds what it claimed through a `Lease`: every later change to those checks must name its token (see
`transitions`), and once the lease expires any worker may claim them again, so a dead or stalled worker never
strands a check. The lease conditions (`held`, `status_is`) are shared with `transitions`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger.models import CheckRow, new_id, utcnow
from worker.ledger.queries import claim_rows
from worker.ledger.states import CheckStatus


@dataclass(frozen=True)
class Lease:
    """A worker's hold on the checks it claimed: who holds them, the token every change must name, for how long.

    One lease per batch: the heartbeat renews it, and once it expires any worker may claim the checks again.
    """

    owner: str  # host:pid, for people reading the ledger
    token: str
    seconds: float

    @classmethod
    def new(cls, owner: str, seconds: float) -> Lease:
        return cls(owner, new_id(), seconds)


def claim(
    session: Session,
    *,
    pipeline_version_id: str,
    limit: int,
    lease: Lease,
    max_attempts: int,
    priority: int | None = None,
) -> list[CheckRow]:
    """Takes up to `limit` checks of one pipeline version for a batch, under `lease`: running, attempts + 1.

    Claimable are queued checks whose `available_at` has come (a retry waits out its backoff), and running
    ones whose lease expired (their worker died or stalled). Lower priorities go first (fresh uploads before
    re-scores), then the oldest, expired leases and queued checks alike; `priority` limits the claim to one
    priority. Rows another worker is claiming are skipped (see `claim_rows`), so two workers never share a
    check. Checks that used up `max_attempts` are left for the reconciler to fail: an image that kills its
    worker every time must not be claimed forever.

    On PostgreSQL queued and expired checks are picked apart, each from its own partial index in claim order
    (`ix_checks_claim_queued`, `ix_checks_claim_running`), so a claim reads about `limit` entries of each however
    long the backlog, instead of sorting every claimable check (see `claim_rows`).
    """
    now = utcnow()
    claimable = sa.and_(CheckRow.pipeline_version_id == pipeline_version_id, CheckRow.attempts < max_attempts)
    if priority is not None:
        claimable = sa.and_(claimable, CheckRow.priority == priority)
    return claim_rows(
        session,
        CheckRow,
        claimable=claimable,
        any_of=[_ready(now), _lease_expired(now)],
        order_by=[CheckRow.priority, CheckRow.created_at],
        limit=limit,
        values={
            "status": CheckStatus.running,
            "attempts": CheckRow.attempts + 1,
            "started_at": now,
            "updated_at": now,
            "lease_owner": lease.owner,
            "lease_token": lease.token,
            "lease_expires_at": now + timedelta(seconds=lease.seconds),
        },
    )


def renew(session: Session, lease: Lease) -> int:
    """Extends the lease on every check still held under it; returns how many it holds."""
    now = utcnow()
    statement = (
        sa.update(CheckRow)
        .where(held(lease.token))
        .values(lease_expires_at=now + timedelta(seconds=lease.seconds), updated_at=now)
    )
    return session.execute(statement).rowcount


def release(session: Session, lease: Lease) -> int:
    """Gives back the checks still held under `lease` that were never run (a stopping worker's prefetched
    batch): queued and claimable at once, the attempt not counted. Returns how many."""
    now = utcnow()
    statement = (
        sa.update(CheckRow)
        .where(held(lease.token))
        .values(status=CheckStatus.queued, attempts=CheckRow.attempts - 1, lease_expires_at=None, updated_at=now)
    )
    return session.execute(statement).rowcount


def defer(session: Session, lease: Lease, check_ids: list[str], available_at: datetime) -> int:
    """Gives back checks held under `lease` that leave their batch before it runs (their bytes are still
    downloading): queued, claimable from `available_at`, the attempt not counted. Returns how many."""
    if not check_ids:
        return 0
    statement = (
        sa.update(CheckRow)
        .where(held(lease.token), CheckRow.id.in_(check_ids))
        .values(
            status=CheckStatus.queued,
            attempts=CheckRow.attempts - 1,
            available_at=available_at,
            lease_expires_at=None,
            updated_at=utcnow(),
        )
    )
    return session.execute(statement).rowcount


def held(token: str) -> sa.ColumnElement[bool]:
    """The check is running under the lease `token` (expired or not: until another worker claims it, it is ours)."""
    return sa.and_(CheckRow.status == CheckStatus.running, CheckRow.lease_token == token)


def _ready(now: datetime) -> sa.ColumnElement[bool]:
    """Queued, and due (a retry waits out its backoff): what a claim finds in `ix_checks_claim_queued`."""
    return sa.and_(status_is(CheckStatus.queued), CheckRow.available_at <= now)


def _lease_expired(now: datetime) -> sa.ColumnElement[bool]:
    """Running under a lease nobody renewed in time: what a claim finds in `ix_checks_claim_running`."""
    return sa.and_(status_is(CheckStatus.running), CheckRow.lease_expires_at < now)


def status_is(status: CheckStatus) -> sa.ColumnElement[bool]:
    """`status = 'queued'` with the value written into the SQL: with a bound value, PostgreSQL could not use the
    partial indexes (WHERE status = ...) in the generic plan it may keep for a statement the driver prepared."""
    return CheckRow.status == sa.literal(status.value, literal_execute=True)
