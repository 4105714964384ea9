"""The work waiting for GPU workers, as an autoscaler reads it: `item backlog` and KEDA's PostgreSQL triggers.

A Redis list is the wrong thing to scale on here: the intake empties it in milliseconds, and the work then waits in
the ledger. What a GPU worker can take is what a claim takes (`claims.claim`):

    claimable   queued and due, or running under a lease that expired; fewer attempts than ITEM_MAX_ATTEMPTS
    in flight   running under a live lease; the workers (pods) holding them are `busy`
    not due     queued retries waiting out their backoff: claimable later, not now
    exhausted   every attempt used: the reconciler fails them, no worker will take them

A fleet needs max(busy, ceil(claimable / (batch size x loops per worker))) workers: never fewer than those
holding work (scaling them down would only hand their batches back), and one more for each batch-set of checks
nobody holds. KEDA computes exactly that from two triggers, whose queries are `keda_queries()`: the HPA takes the
larger of ceil(claimable / target) and ceil(busy / 1). The queries are plain SQL with their constants written in,
so the manifests in ops/k8s hold the very text this module makes (a test compares them), and each count stops at
`cap` rows: a backlog past it reads as the cap, which scales the fleet to its maximum all the same.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger import claims
from worker.ledger.listing import COUNT_CAP, capped_count, capped_count_query
from worker.ledger.models import CheckRow, PipelineVersionRow, utcnow
from worker.ledger.states import CheckStatus, Priority


@dataclass
class VersionBacklog:
    fresh: int = 0  # claimable fresh uploads (queued and due, or a lease expired)
    rescore: int = 0  # claimable re-scores
    expired_leases: int = 0  # of those, running under a lease nobody renewed (their worker died)
    running: int = 0  # in flight under a live lease
    not_due: int = 0  # queued retries still waiting out their backoff
    exhausted: int = 0  # unfinished with every attempt used: the reconciler's to fail

    @property
    def claimable(self) -> int:
        return self.fresh + self.rescore


@dataclass
class Backlog:
    versions: dict[str, VersionBacklog] = field(default_factory=dict)
    busy_workers: int = 0  # hosts (pods) holding a live lease
    capped_at: int = COUNT_CAP

    @property
    def claimable(self) -> int:
        return sum(version.claimable for version in self.versions.values())

    def desired_workers(self, per_worker: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        """Workers for this backlog: those holding work, or one per `per_worker` claimable checks if more."""
        wanted = max(self.busy_workers, math.ceil(self.claimable / max(1, per_worker)), minimum)
        return wanted if maximum is None else min(wanted, maximum)

    def to_dict(self, per_worker: int, *, minimum: int = 0, maximum: int | None = None) -> dict:
        totals = {name: sum(getattr(v, name) for v in self.versions.values()) for name in _COUNTS}
        return {
            "claimable": self.claimable,
            **totals,
            "busy_workers": self.busy_workers,
            "per_worker": per_worker,
            "desired_workers": self.desired_workers(per_worker, minimum=minimum, maximum=maximum),
            "capped_at": self.capped_at,
            "versions": {vid: {"claimable": v.claimable, **_counts(v)} for vid, v in sorted(self.versions.items())},
        }


_COUNTS = ("fresh", "rescore", "expired_leases", "running", "not_due", "exhausted")


def _counts(version: VersionBacklog) -> dict[str, int]:
    return {name: getattr(version, name) for name in _COUNTS}


def read_backlog(
    session: Session, *, max_attempts: int, versions: list[str] | None = None, cap: int = COUNT_CAP
) -> Backlog:
    """The backlog of `versions` (default: every registered version), each count read from the claim indexes and
    stopping at `cap`. A few index range reads per version: versions are few (one per model upgrade)."""
    now = utcnow()
    if versions is None:
        versions = list(session.scalars(sa.select(PipelineVersionRow.id).order_by(PipelineVersionRow.id)))
    backlog = Backlog(capped_at=cap)
    for version_id in versions:
        counts = VersionBacklog(**{name: capped_count(session, where, cap) for name, where in
                                   _conditions(version_id, now, max_attempts).items()})  # fmt: skip
        if any(_counts(counts).values()):
            backlog.versions[version_id] = counts
    backlog.busy_workers = len(_busy_hosts(session, now, versions))
    return backlog


def _conditions(version_id: str, now: datetime, max_attempts: int) -> dict[str, sa.ColumnElement[bool]]:
    of_version = CheckRow.pipeline_version_id == version_id
    left = CheckRow.attempts < max_attempts
    claimable = sa.or_(claims.ready(now), claims.lease_expired(now))
    queued = claims.status_is(CheckStatus.queued)
    return {
        "fresh": sa.and_(of_version, left, CheckRow.priority == Priority.fresh, claimable),
        "rescore": sa.and_(of_version, left, CheckRow.priority == Priority.rescore, claimable),
        "expired_leases": sa.and_(of_version, left, claims.lease_expired(now)),
        "running": sa.and_(of_version, _in_flight(now)),
        "not_due": sa.and_(of_version, left, queued, CheckRow.available_at > now),
        "exhausted": sa.and_(of_version, CheckRow.attempts >= max_attempts, sa.or_(queued, claims.lease_expired(now))),
    }


def _in_flight(now: datetime | sa.ColumnElement) -> sa.ColumnElement[bool]:
    """Running under a live lease."""
    return sa.and_(claims.status_is(CheckStatus.running), CheckRow.lease_expires_at >= now)


def _busy_hosts(session: Session, now: datetime, versions: list[str]) -> set[str]:
    """The hosts holding a live lease: a lease's owner is `host:pid` (a Kubernetes pod's host name is its name).
    Only the checks in flight are read: a few batches per GPU loop."""
    owners = session.scalars(
        sa.select(CheckRow.lease_owner).where(_in_flight(now), CheckRow.pipeline_version_id.in_(versions)).distinct()
    )
    return {owner.split(":", 1)[0] for owner in owners if owner}


def keda_queries(*, max_attempts: int, versions: list[str] | None = None, cap: int = COUNT_CAP) -> dict[str, str]:
    """The PostgreSQL text of KEDA's two triggers (`claimable`, `busy`), each returning one number: the conditions
    `read_backlog` counts with, on the database's clock, every constant written in (KEDA passes no parameters).
    `versions` narrows both to a deployment's versions."""
    now = sa.func.now()
    narrowed = [CheckRow.pipeline_version_id.in_([_version_id(v) for v in versions])] if versions else []
    claimable = sa.and_(sa.or_(claims.ready(now), claims.lease_expired(now)), CheckRow.attempts < max_attempts)
    busy = sa.select(sa.func.count(sa.distinct(sa.func.split_part(CheckRow.lease_owner, ":", 1))))
    return {
        "claimable": _postgresql(capped_count_query(sa.and_(claimable, *narrowed), cap)),
        "busy": _postgresql(busy.where(_in_flight(now), *narrowed)),
    }


def _postgresql(query: sa.Select) -> str:
    from sqlalchemy.dialects import postgresql

    compiled = query.compile(dialect=postgresql.dialect(), compile_kwargs={"literal_binds": True})
    return " ".join(str(compiled).split())


def _version_id(value: str) -> str:
    """A version id is `pv-<hex>`: anything else is refused, never written into a query."""
    if not value.replace("-", "").replace("_", "").isalnum() or len(value) > 64:
        raise ValueError(f"not a pipeline version id: {value!r}")
    return value
