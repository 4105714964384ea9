"""Reading checks in bulk for people and metrics: pages of checks, counts per status, waiting and stuck checks,
and the intake's dead letters.

These only read, and none of them is on a worker's path: the command line, the API and console, the metrics
endpoint and the reconciler ask them, each in one query.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger import rollups
from worker.ledger.claims import status_is
from worker.ledger.models import CheckRow, DeadLetterRow, utcnow
from worker.ledger.queries import fresh
from worker.ledger.states import CheckStatus, Priority

# Unfinished checks no worker is moving (`item_checks_stuck`): running ones whose lease nobody renews and nobody
# took over, and fresh ones nobody claims (no live worker of their version). A queued re-score is left out:
# waiting behind fresh uploads for hours is its job.
_STUCK = sa.or_(
    CheckRow.status == CheckStatus.running,
    sa.and_(CheckRow.status == CheckStatus.queued, CheckRow.priority == Priority.fresh),
)


COUNT_CAP = 100_000  # a count read at every scrape or page view stops here: it reads an index, never a year of rows


def count_waiting(
    session: Session, cap: int = COUNT_CAP, *, tenant_id: str | None = None, not_of: list[str] | None = None
) -> dict[str, int]:
    """Queued checks a worker may claim now, fresh uploads and re-scores apart (`item_checks_waiting`), each
    counted up to `cap` (a backlog past it reads as `cap`: the alert has long fired by then); of one tenant when
    given (the claim indexes lead with it), or of every tenant but those `not_of`."""
    now = utcnow()
    counts = {}
    mine = [CheckRow.tenant_id == tenant_id] if tenant_id is not None else []
    mine += [CheckRow.tenant_id.not_in(not_of)] if not_of else []
    for priority, name in ((Priority.fresh, "fresh"), (Priority.rescore, "rescore")):
        due = sa.and_(status_is(CheckStatus.queued), CheckRow.priority == priority, CheckRow.available_at <= now, *mine)
        counts[name] = capped_count(session, due, cap)
    return counts


def count_unfinished(
    session: Session,
    *,
    version_id: str | None = None,
    priority: int | None = None,
    cap: int = COUNT_CAP,
    tenant_id: str | None = None,
) -> dict[str, int]:
    """Queued and running checks now (of one version, priority and tenant, when given), each read from its partial
    claim index and counted up to `cap`: the live part of the counts whose ended part comes from the rollups."""
    narrowed = []
    if tenant_id is not None:
        narrowed.append(CheckRow.tenant_id == tenant_id)
    if version_id is not None:
        narrowed.append(CheckRow.pipeline_version_id == version_id)
    if priority is not None:
        narrowed.append(CheckRow.priority == priority)
    statuses = (CheckStatus.queued, CheckStatus.running)
    return {status.value: capped_count(session, sa.and_(status_is(status), *narrowed), cap) for status in statuses}


def stuck_checks(session: Session, older_than: timedelta, limit: int = 500) -> list[CheckRow]:
    """Unfinished checks untouched for `older_than`, oldest first: no worker is moving them (see _STUCK)."""
    query = (
        sa.select(CheckRow)
        .where(_STUCK, CheckRow.updated_at < utcnow() - older_than)
        .order_by(CheckRow.updated_at, CheckRow.id)
        .limit(limit)
    )
    return list(session.scalars(fresh(query)))


def count_stuck(session: Session, older_than: timedelta, cap: int = COUNT_CAP) -> dict[str, int]:
    """Unfinished checks untouched for `older_than`, per status, each counted up to `cap` (for the metrics
    endpoint, at every scrape, and the reconciler)."""
    before = utcnow() - older_than
    stuck = {
        CheckStatus.running: CheckRow.status == CheckStatus.running,
        CheckStatus.queued: sa.and_(CheckRow.status == CheckStatus.queued, CheckRow.priority == Priority.fresh),
    }
    return {str(status): capped_count(session, sa.and_(where, CheckRow.updated_at < before), cap)
            for status, where in stuck.items()}  # fmt: skip


def capped_count(session: Session, where: sa.ColumnElement[bool], cap: int) -> int:
    """`count(*)` of the rows matching `where`, reading at most `cap` of them."""
    return int(session.execute(capped_count_query(where, cap)).scalar_one())


def capped_count_query(where: sa.ColumnElement[bool], cap: int) -> sa.Select:
    matching = sa.select(sa.literal(1)).select_from(CheckRow).where(where).limit(cap).subquery()
    return sa.select(sa.func.count()).select_from(matching)


def list_checks(
    session: Session,
    *,
    status: str | None = None,
    verdict: str | list[str] | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    external_id: str | None = None,
    pipeline_version_id: str | None = None,
    p_fake_at_least: float | None = None,
    p_fake_below: float | None = None,
    after: tuple[datetime, str] | None = None,
    limit: int = 100,
    tenant_id: str | None = None,
) -> list[CheckRow]:
    """Checks newest first; `since` is inclusive and `until` exclusive, both on created_at.

    `after` is a page's cursor: the (created_at, id) of the last check of the previous page, so a page is
    an index range read however deep it is, and checks filed meanwhile never shift the pages. `tenant_id`: that
    tenant's checks only (an index range of its own: (tenant_id, created_at, id)); None: every tenant's.
    """
    query = sa.select(CheckRow).order_by(CheckRow.created_at.desc(), CheckRow.id.desc()).limit(limit)
    if tenant_id is not None:
        query = query.where(CheckRow.tenant_id == tenant_id)
    if external_id is not None:
        query = query.where(CheckRow.external_id == external_id)
    if pipeline_version_id is not None:
        query = query.where(CheckRow.pipeline_version_id == pipeline_version_id)
    if status is not None:
        query = query.where(CheckRow.status == CheckStatus(status))  # ValueError names a bad status
    if isinstance(verdict, str):
        query = query.where(CheckRow.verdict == verdict)
    elif verdict is not None:
        query = query.where(CheckRow.verdict.in_(verdict))
    if since is not None:
        query = query.where(CheckRow.created_at >= since)
    if until is not None:
        query = query.where(CheckRow.created_at < until)
    if p_fake_at_least is not None:
        query = query.where(CheckRow.p_fake >= p_fake_at_least)
    if p_fake_below is not None:
        query = query.where(CheckRow.p_fake < p_fake_below)
    if after is not None:
        moment, check_id = after
        query = query.where(
            sa.or_(CheckRow.created_at < moment, sa.and_(CheckRow.created_at == moment, CheckRow.id < check_id))
        )
    return list(session.scalars(fresh(query)))


def count_by_status(session: Session, *, tenant_id: str | None = None) -> dict[str, int]:
    """Checks per status (of one tenant, when given), every status present (zero included) so dashboards see
    stable keys: the ended ones from the rollups' all-time totals (endings: a check a resubmission replaced counts
    its earlier one too), the queued and running ones now, each up to COUNT_CAP (see `count_unfinished`). A few
    hundred rows read."""
    counts = {status.value: 0 for status in CheckStatus}
    for (_, status), n in rollups.totals(session, tenant_id=tenant_id).items():
        counts[status] += n
    return counts | count_unfinished(session, tenant_id=tenant_id)


def dead_letters(session: Session, *, limit: int = 100, tenant_id: str | None = None) -> list[DeadLetterRow]:
    """Messages the intake could not file, newest first; with `tenant_id`, those that came in on its queue (a
    letter whose tenant is unknown is no tenant's, and shows only without the filter)."""
    query = sa.select(DeadLetterRow).order_by(DeadLetterRow.received_at.desc(), DeadLetterRow.id).limit(limit)
    if tenant_id is not None:
        query = query.where(DeadLetterRow.tenant_id == tenant_id)
    return list(session.scalars(query))
