"""Claiming checks for a batch under a lease, renewing the lease, and giving unrun checks back (all of a batch
when its worker stops, or the few whose bytes are late to arrive).

A worker holds what it claimed through a `Lease`: every later change to those checks must name its token (see
`transitions`), and once the lease expires any worker may claim them again, so a dead or stalled worker never
strands a check. The lease conditions (`held`, `status_is`) are shared with `transitions`.
"""

from __future__ import annotations

import heapq
import math
import socket
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger.models import DEFAULT_TENANT, CheckRow, TenantRow, new_id, utcnow
from worker.ledger.queries import claim_shares
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


# Lower priorities first, then the oldest. `available_at` breaks no tie that matters: it is there so that only the
# claim index of queued checks reads rows in this order. With the tenant, version and priority fixed by equality,
# PostgreSQL drops them from the order it needs, and (priority, created_at) alone would let it walk the listing
# index (created_at, id) instead, filtering out every check already claimed or done at the head of that index:
# thousands of rows a pick, seen with ten tenants (tests/bench/bench_claim.py --tenants 10).
CLAIM_ORDER = (CheckRow.priority, CheckRow.created_at, CheckRow.available_at)


class FairShare:
    """Weighted fair claiming across tenants, for one claimer (a GPU loop): stride scheduling.

    Each tenant has a pass, its checks claimed so far divided by its weight; a claim's slots go one at a time to the
    tenant with work whose pass (counting the slots it was given already) is lowest. Over many claims each tenant
    with work gets slots in proportion to its weight, however long another tenant's backlog is, and a tenant's own
    checks keep their order (priority, then oldest first). A tenant that had no work does not bank its unused
    share: when it has work again its pass is raised to the lowest pass of the tenants with work, less one claim's
    worth of slots (`limit`), so it is served at once without being able to starve the others.

    Weights are read from `tenants` at most every `refresh_s`, so a tenant created while a loop knew of one tenant
    only has its checks claimed within that time (a loop of one tenant claims without asking which have work). The
    state is this process's: several loops each share fairly, so together they do too.
    """

    def __init__(self, refresh_s: float = 10.0):
        self.refresh_s = refresh_s
        self._weights: dict[str, int] = {}
        self._read_at = -math.inf
        self._passes: dict[str, float] = {}

    def weights(self, session: Session) -> dict[str, int]:
        if time.monotonic() - self._read_at >= self.refresh_s or not self._weights:
            rows = session.execute(sa.select(TenantRow.id, TenantRow.weight)).tuples().all()
            self._weights = {tenant: max(1, weight) for tenant, weight in rows} or {DEFAULT_TENANT: 1}
            self._read_at = time.monotonic()
        return self._weights

    def allot(self, slots: int, busy: list[str], weights: dict[str, int]) -> dict[str, int]:
        """`slots` given out among the tenants `busy` (with work now), by weight and pass."""
        known = [self._passes[tenant] for tenant in busy if tenant in self._passes]
        floor = min(known, default=0.0)
        for tenant in busy:  # a tenant back from idle (or new): served first, by at most one claim's worth
            earliest = floor - slots / weights[tenant] if known else floor
            self._passes[tenant] = max(self._passes.get(tenant, -math.inf), earliest)
        given = dict.fromkeys(busy, 0)
        heap = [(self._passes[tenant] + 1 / weights[tenant], tenant) for tenant in busy]
        heapq.heapify(heap)
        for _ in range(slots):
            _, tenant = heapq.heappop(heap)
            given[tenant] += 1
            heapq.heappush(heap, (self._passes[tenant] + (given[tenant] + 1) / weights[tenant], tenant))
        return {tenant: n for tenant, n in given.items() if n}

    def charge(self, claimed: Counter, weights: dict[str, int]) -> None:
        for tenant, n in claimed.items():
            self._passes[tenant] = self._passes.get(tenant, 0.0) + n / weights.get(tenant, 1)


def claim(
    session: Session,
    *,
    pipeline_version_id: str,
    limit: int,
    lease: Lease,
    max_attempts: int,
    priority: int | None = None,
    fair: FairShare | None = None,
) -> list[CheckRow]:
    """Takes up to `limit` checks of one pipeline version for a batch, under `lease`: running, attempts + 1.

    Claimable are queued checks whose `available_at` has come (a retry waits out its backoff), and running
    ones whose lease expired (their worker died or stalled). Lower priorities go first (fresh uploads before
    re-scores), then the oldest, expired leases and queued checks alike; `priority` limits the claim to one
    priority. Rows another worker is claiming are skipped (see `claim_rows`), so two workers never share a
    check. Checks that used up `max_attempts` are left for the reconciler to fail: an image that kills its
    worker every time must not be claimed forever.

    Fair across tenants (`FairShare`, the claimer's own; a new one when none is given): with more than one
    tenant, a query first finds the tenants with claimable checks (an index probe each), the slots are allotted
    among them by weight, and each tenant's share is picked from its own range of the claim indexes, all in one
    statement; slots a tenant could not fill go, in a second statement, to the tenants that filled theirs.

    On PostgreSQL queued and expired checks are picked apart, each from its own partial index in claim order
    (`ix_checks_claim_queued`, `ix_checks_claim_running`), so a claim reads about `limit` entries of each however
    long the backlog, instead of sorting every claimable check (see `claim_rows`).
    """
    fair = fair or FairShare()
    now = utcnow()
    claimable = sa.and_(CheckRow.pipeline_version_id == pipeline_version_id, CheckRow.attempts < max_attempts)
    if priority is not None:
        claimable = sa.and_(claimable, CheckRow.priority == priority)
    any_of = [ready(now), lease_expired(now)]
    weights = fair.weights(session)
    busy = sorted(weights) if len(weights) == 1 else _tenants_with_work(session, claimable, any_of)
    claimed: list[CheckRow] = []
    for _ in range(2):  # the allotment, then what tenants with less work left to those with more
        left = limit - len(claimed)
        if left <= 0 or not busy:
            break
        allotted = fair.allot(left, busy, {tenant: weights.get(tenant, 1) for tenant in busy})
        rows = claim_shares(
            session,
            CheckRow,
            claimable=claimable,
            shares=[(CheckRow.tenant_id == tenant, n) for tenant, n in allotted.items()],
            any_of=any_of,
            order_by=CLAIM_ORDER,
            values=_claimed_values(now, lease),
        )
        got = Counter(row.tenant_id for row in rows)
        fair.charge(got, weights)
        claimed += rows
        busy = [tenant for tenant, n in allotted.items() if got[tenant] >= n]  # they may have more
    claimed.sort(key=lambda row: (row.priority, row.created_at))
    return claimed


def _tenants_with_work(
    session: Session, claimable: sa.ColumnElement[bool], any_of: list[sa.ColumnElement[bool]]
) -> list[str]:
    """The tenants with a claimable check: for each tenant, the first entry of each claim index's range.

    Each probe is a correlated LIMIT 1 in claim order, so PostgreSQL walks the tenant's range of the claim index and
    stops at the first claimable check. As an EXISTS it chose bitmap scans that read a tenant's whole backlog."""
    first = [
        sa.select(CheckRow.id)
        .where(CheckRow.tenant_id == TenantRow.id, claimable, alternative)
        .order_by(*CLAIM_ORDER)
        .limit(1)
        .correlate(TenantRow)
        .scalar_subquery()
        for alternative in any_of
    ]
    has_work = sa.or_(*(probe.is_not(None) for probe in first))
    return list(session.scalars(sa.select(TenantRow.id).where(has_work).order_by(TenantRow.id)))


def _claimed_values(now: datetime, lease: Lease) -> dict:
    return {
        "status": CheckStatus.running,
        "attempts": CheckRow.attempts + 1,
        "started_at": now,
        "updated_at": now,
        "lease_owner": lease.owner,
        "lease_token": lease.token,
        "lease_expires_at": now + timedelta(seconds=lease.seconds),
    }


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


def give_back_owner(session: Session, owner: str, max_attempts: int) -> tuple[int, int]:
    """Gives back every check still `running` under a lease of `owner`, a GPU process that ended (killed, as it did
    not stop in time): queued and claimable at once, rather than after its lease runs out. The attempt stays
    counted, as the batch was in hand when the process died, so a check that hangs the models uses its attempts
    up instead of being given back for ever. One that used every attempt is never claimed again, and a queued one
    nobody would fail: it stays `running` with its lease expired now, for the reconciler to fail (`check.stuck`)
    at its next pass. Returns how many were given back, and how many left to the reconciler."""
    now = utcnow()
    mine = sa.and_(status_is(CheckStatus.running), CheckRow.lease_owner == owner)
    queued = sa.update(CheckRow).where(mine, CheckRow.attempts < max_attempts)
    queued = queued.values(status=CheckStatus.queued, available_at=now, lease_expires_at=None, updated_at=now)
    expired = sa.update(CheckRow).where(mine, CheckRow.attempts >= max_attempts)
    expired = expired.values(lease_expires_at=now, updated_at=now)
    return session.execute(queued).rowcount, session.execute(expired).rowcount


def owner_of(pid: int) -> str:
    """The lease owner of process `pid` of this host (`Lease.owner`), for people reading the ledger."""
    return f"{socket.gethostname()}:{pid}"[:128]


def held(token: str) -> sa.ColumnElement[bool]:
    """The check is running under the lease `token` (expired or not: until another worker claims it, it is ours)."""
    return sa.and_(CheckRow.status == CheckStatus.running, CheckRow.lease_token == token)


def ready(now: datetime | sa.ColumnElement) -> sa.ColumnElement[bool]:
    """Queued, and due (a retry waits out its backoff): what a claim finds in `ix_checks_claim_queued`. `now` is a
    time, or the database's `now()` in a query that runs on its own (KEDA's, `worker.ledger.backlog`)."""
    return sa.and_(status_is(CheckStatus.queued), CheckRow.available_at <= now)


def lease_expired(now: datetime | sa.ColumnElement) -> sa.ColumnElement[bool]:
    """Running under a lease nobody renewed in time: what a claim finds in `ix_checks_claim_running`."""
    return sa.and_(status_is(CheckStatus.running), CheckRow.lease_expires_at < now)


def status_is(status: CheckStatus) -> sa.ColumnElement[bool]:
    """`status = 'queued'` with the value written into the SQL: with a bound value, PostgreSQL could not use the
    partial indexes (WHERE status = ...) in the generic plan it may keep for a statement the driver prepared."""
    return CheckRow.status == sa.literal(status.value, literal_execute=True)
