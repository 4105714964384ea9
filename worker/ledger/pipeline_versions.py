"""Pipeline versions in the ledger: registering the one a worker runs, choosing the active one, and counting
checks per version.

A check belongs to the version it is scored under, and new checks (fresh uploads and re-scores) are made for the
most recently activated one; operators roll out and roll back by activating, so these few statements live apart
from the checks themselves.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.orm import Session

from pipeline.core.results import PipelineVersion
from worker.ledger import listing, rollups
from worker.ledger.models import PipelineVersionRow, utcnow
from worker.ledger.queries import dialect_insert


def ensure_pipeline_version(session: Session, version: PipelineVersion, profile: str, *, activate: bool = True) -> bool:
    """Registers the version once, as the active one unless told not to; later calls change nothing.

    Returns whether this call registered it. A version registered earlier keeps its activation state, so a
    worker restarted on an old head does not take new checks away from the version an operator activated.
    """
    now = utcnow()
    activated = now if activate else None
    row = {"id": version.id, "profile": profile, **version.stages, "created_at": now, "activated_at": activated}
    statement = dialect_insert(session, PipelineVersionRow).values(row).on_conflict_do_nothing()
    return session.execute(statement.returning(PipelineVersionRow.id)).scalar_one_or_none() is not None


def activate_version(session: Session, version_id: str) -> PipelineVersionRow | None:
    """Makes a registered version the one new checks are made for (a rollback, or a staged rollout)."""
    statement = (
        sa.update(PipelineVersionRow)
        .where(PipelineVersionRow.id == version_id)
        .values(activated_at=utcnow())
        .returning(PipelineVersionRow)
    )
    return session.scalars(statement).one_or_none()


def active_version(session: Session) -> PipelineVersionRow | None:
    """The most recently activated version: new checks and re-scores are made for it."""
    query = (
        sa.select(PipelineVersionRow)
        .where(PipelineVersionRow.activated_at.is_not(None))
        .order_by(PipelineVersionRow.activated_at.desc(), PipelineVersionRow.id)
        .limit(1)
    )
    return session.scalars(query).one_or_none()


def versions(session: Session) -> list[PipelineVersionRow]:
    """Every registered version, oldest first."""
    query = sa.select(PipelineVersionRow).order_by(PipelineVersionRow.created_at, PipelineVersionRow.id)
    return list(session.scalars(query))


def checks_per_version(session: Session) -> dict[str, dict[str, int]]:
    """{version id: {status: count}}, the statuses a version has checks in: ended ones from the rollups' all-time
    totals, queued and running ones now, each up to COUNT_CAP (see `listing.count_by_status`)."""
    counts: dict[str, dict[str, int]] = {}
    for (version_id, status), n in rollups.totals(session).items():
        counts.setdefault(version_id, {})[status] = n
    for version_id in session.scalars(sa.select(PipelineVersionRow.id)):
        for status, n in listing.count_unfinished(session, version_id=version_id).items():
            if n:
                counts.setdefault(version_id, {})[status] = n
    return counts
