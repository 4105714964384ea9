"""Quotas: how many new checks a tenant may file now, decided in the ledger so every intake process shares them.

Two limits per tenant (`item tenants set`), each optional:
- a rate, as a token bucket: `rate_per_s` tokens a second up to `burst` (unset: one second of the rate, at least
  one), one token per check. The bucket is a row of `tenant_buckets`, refilled and taken in one conditional
  UPDATE ... RETURNING in the filing transaction: the row lock makes concurrent intakes (threads, processes,
  hosts) take turns, so together they never admit more than `burst + rate × t`; a filing that rolls back gives
  its tokens back with it.
- a backlog cap: at most `backlog_cap` fresh checks of the tenant queued at once, counted on the claim index
  (which leads with the tenant) up to the cap, so the count costs at most `cap` index entries whatever the
  backlog. Re-scores are not counted: an upgrade's re-score of a tenant's history must not stop its uploads.
  Two intakes filing for one tenant at the same moment may each see room for their batch: the cap holds to
  within one batch per concurrent intake.

A batch admits its first k checks and refuses the rest (`Admission`): an HTTP request holds one check, so it is
admitted or refused whole. A refusal says when to try again: for the rate, when the bucket holds the next token
(at least 1 s); for the backlog, ITEM_QUOTA_BACKLOG_RETRY_S (the queue drains at the workers' pace, which the
intake cannot know). A tenant without limits costs no statement: its limits are read from the tenant's row, which
the filing loaded already (`Intake.version_for`), so a change of limits applies at the next filing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from pipeline.core.errors import ItemError
from worker.ledger.claims import status_is
from worker.ledger.listing import capped_count
from worker.ledger.models import CheckRow, TenantBucketRow, TenantRow, UTCDateTime, utcnow
from worker.ledger.queries import dialect_insert
from worker.ledger.states import CheckStatus, Priority
from worker.settings import Settings

EPSILON = 1e-9  # a bucket refilled to 0.9999999999 of a token by float arithmetic holds that token
SLACK_S = 0.001  # of refill granted to rounding: SQLite's time arithmetic (julianday) resolves about 50 µs


class QuotaExceeded(ItemError):
    """More checks than the tenant's rate allows now. Transient for the platform: send again after
    `retry_after_s` (HTTP: 429 with Retry-After; the broker: the check is `rejected` with this code, and a
    resubmission under the same external id replaces it)."""

    code = "quota.exceeded"

    def __init__(self, message: str, retry_after_s: int = 1, *, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s


class BacklogFull(QuotaExceeded):
    """The tenant has its backlog cap of checks queued already: more would wait behind them anyway."""

    code = "quota.backlog"


@dataclass(frozen=True)
class Limits:
    rate_per_s: float | None = None
    burst: int | None = None
    backlog_cap: int | None = None

    @property
    def bucket_size(self) -> float:
        return float(self.burst) if self.burst is not None else max(1.0, self.rate_per_s or 0.0)

    @property
    def none(self) -> bool:
        return self.rate_per_s is None and self.backlog_cap is None


NO_LIMITS = Limits()


@dataclass(frozen=True)
class Admission:
    """Of `asked` checks, the first `admitted` may be filed; `refused` says why the others may not (None: all
    admitted)."""

    asked: int
    admitted: int
    refused: QuotaExceeded | None = None


@dataclass
class Quotas:
    """One intake process's admissions: the statements that decide."""

    settings: Settings

    def admit(self, session: Session, tenant_id: str, n: int, *, now: datetime | None = None) -> Admission:
        """Admits up to `n` new checks of `tenant_id` in the caller's transaction (tokens taken with it)."""
        if n <= 0:
            return Admission(n, n)
        limits = self.limits(session, tenant_id)
        if limits.none:
            return Admission(n, n)
        room = n if limits.backlog_cap is None else min(n, backlog_room(session, tenant_id, limits.backlog_cap))
        refused: QuotaExceeded | None = None
        if room < n:
            refused = BacklogFull(
                f"Tenant {tenant_id!r} has {limits.backlog_cap:,} checks queued, its backlog cap: send again "
                "once they are done.",
                self.settings.quota_backlog_retry_s,
            )
        if room and limits.rate_per_s is not None:
            taken, wait_s = take_tokens(session, tenant_id, room, limits, now or utcnow())
            if taken < room:
                refused = QuotaExceeded(
                    f"Tenant {tenant_id!r} files at most {limits.rate_per_s:g} checks a second (bursts of "
                    f"{limits.bucket_size:g}): send again in {wait_s} s.",
                    wait_s,
                )
            room = taken
        return Admission(n, room, refused)

    def limits(self, session: Session, tenant_id: str) -> Limits:
        """The tenant's limits, from its row: in the session already when the filing checked the tenant
        (`Intake.version_for`), so no statement; read if not."""
        row = session.get(TenantRow, tenant_id)
        return NO_LIMITS if row is None else Limits(row.rate_per_s, row.burst, row.backlog_cap)


# ---------------------------------------------------------------------- the bucket


def take_tokens(session: Session, tenant_id: str, n: int, limits: Limits, now: datetime) -> tuple[int, int]:
    """Takes up to `n` tokens of the tenant's bucket (refilled to `now` first): (tokens taken, seconds until the
    next token when fewer than `n` were). All `n` in one statement when the bucket has them; fewer costs a read
    and another conditional take (which takes nothing if another intake took them meanwhile)."""
    if _take(session, tenant_id, n, limits, now):
        return n, 0
    row = session.execute(
        sa.select(TenantBucketRow.tokens, TenantBucketRow.refilled_at).where(TenantBucketRow.tenant_id == tenant_id)
    ).first()
    if row is None:  # the tenant's first admission: a full bucket
        insert = dialect_insert(session, TenantBucketRow).values(
            tenant_id=tenant_id, tokens=limits.bucket_size, refilled_at=now
        )
        session.execute(insert.on_conflict_do_nothing())
        if _take(session, tenant_id, n, limits, now):
            return n, 0
        row = session.execute(
            sa.select(TenantBucketRow.tokens, TenantBucketRow.refilled_at).where(TenantBucketRow.tenant_id == tenant_id)
        ).one()
    elapsed = max(0.0, (now - row.refilled_at).total_seconds())
    available = min(limits.bucket_size, row.tokens + limits.rate_per_s * elapsed)
    taken = min(n - 1, math.floor(available + _slack(limits)))
    if taken > 0 and not _take(session, tenant_id, taken, limits, now):
        taken, available = 0, 0.0  # raced: another intake took them; the wait below is then an estimate
    missing = 1.0 - (available - taken)  # of the next token
    return taken, max(1, math.ceil(missing / limits.rate_per_s - EPSILON))


def _slack(limits: Limits) -> float:
    return limits.rate_per_s * SLACK_S + EPSILON


def _take(session: Session, tenant_id: str, n: int, limits: Limits, now: datetime) -> bool:
    """The one conditional UPDATE: refill to `now`, then take `n` if the bucket holds them."""
    bucket = TenantBucketRow.__table__
    at = sa.bindparam("now", now, type_=UTCDateTime)
    if session.get_bind().dialect.name == "postgresql":
        elapsed = sa.cast(sa.extract("epoch", at - bucket.c.refilled_at), sa.Float)
        least, greatest = sa.func.least, sa.func.greatest
    else:  # SQLite keeps times as text, which julianday() reads
        elapsed = (sa.func.julianday(at) - sa.func.julianday(bucket.c.refilled_at)) * 86_400.0
        least, greatest = sa.func.min, sa.func.max
    refilled = sa.literal(float(limits.rate_per_s), sa.Float) * greatest(sa.literal(0.0, sa.Float), elapsed)
    available = least(sa.literal(limits.bucket_size, sa.Float), bucket.c.tokens + refilled)
    statement = (
        sa.update(bucket)
        .where(bucket.c.tenant_id == tenant_id, available >= n - _slack(limits))
        .values(
            tokens=greatest(sa.literal(0.0, sa.Float), available - n), refilled_at=greatest(bucket.c.refilled_at, at)
        )
        .returning(bucket.c.tokens)
    )
    return session.execute(statement).first() is not None


# ---------------------------------------------------------------------- the backlog


def backlog_room(session: Session, tenant_id: str, cap: int) -> int:
    """How many more fresh checks the tenant may queue: `cap` less those queued, counted up to `cap` on the claim
    index (tenant first), so never more than `cap` entries read."""
    queued = sa.and_(
        status_is(CheckStatus.queued), CheckRow.tenant_id == tenant_id, CheckRow.priority == Priority.fresh
    )
    return cap - capped_count(session, queued, cap)


__all__ = ["Admission", "BacklogFull", "Limits", "QuotaExceeded", "Quotas", "backlog_room", "take_tokens"]
