"""Re-scoring: which finished checks a re-score run takes, creating their re-score checks under the new version,
and how far a run has come.

A run pages through finished checks by external id, however many millions; its re-scores are ordinary checks
(priority rescore, `rescore_of` pointing back at the check they re-score), made on the same (external id,
version) key as any check, so fresh uploads are claimed first and a second run finds its work already filed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from worker.ledger.checks import file_rows, queued_check
from worker.ledger.models import CheckRow, utcnow
from worker.ledger.queries import fresh
from worker.ledger.states import CheckStatus, Priority


@dataclass(frozen=True)
class RescoreSelection:
    """Which finished checks a re-score takes; every field left None selects everything."""

    from_version: str | None = None  # only checks scored under this pipeline version
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    verdict: str | None = None  # real, uncertain or fake
    min_score: float | None = None  # p_fake at or above
    max_score: float | None = None  # p_fake at or below
    external_ids: tuple[str, ...] | None = None  # only these (from a file)

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        checks = CheckRow
        tests = [
            (self.from_version, lambda v: checks.pipeline_version_id == v),
            (self.since, lambda v: checks.created_at >= v),
            (self.until, lambda v: checks.created_at < v),
            (self.verdict, lambda v: checks.verdict == v),
            (self.min_score, lambda v: checks.p_fake >= v),
            (self.max_score, lambda v: checks.p_fake <= v),
            (self.external_ids, lambda v: checks.external_id.in_(v)),
        ]
        return [condition(value) for value, condition in tests if value is not None]


def rescore_candidates(
    session: Session,
    *,
    target_version_id: str,
    selection: RescoreSelection,
    after_external_id: str | None,
    limit: int,
) -> list[CheckRow]:
    """A page of finished checks to re-score under the target version, one per external id (its newest).

    Ordered by external id, so pages follow each other by keyset (`after_external_id`) however many millions
    there are; within an id, the most recently finished check comes first and the rest of its rows are dropped.
    """
    query = (
        sa.select(CheckRow)
        .where(CheckRow.status == CheckStatus.done, CheckRow.pipeline_version_id != target_version_id)
        .order_by(CheckRow.external_id, CheckRow.finished_at.desc(), CheckRow.id)
        .limit(limit)
    )
    for condition in selection.conditions():
        query = query.where(condition)
    if after_external_id is not None:
        query = query.where(CheckRow.external_id > after_external_id)
    rows = list(session.scalars(fresh(query)))
    if len(rows) == limit:  # the page may end inside an id another tenant uses too: take that id's rows whole,
        last = rows[-1].external_id  # or the next page (after it) would skip the other tenant's upload
        rows += session.scalars(fresh(query.limit(None).where(CheckRow.external_id == last)))
    newest: dict[tuple[str, str], CheckRow] = {}
    for row in rows:
        newest.setdefault((row.tenant_id, row.external_id), row)  # each tenant's upload is its own
    return list(newest.values())


def create_rescores(
    session: Session, earlier: list[CheckRow], version_id: str
) -> tuple[dict[tuple[str, str], CheckRow], set[str]]:
    """Re-score checks of `earlier` under `version_id`, by (tenant, external id), and the ids of those this call
    made. Each stays its tenant's: filed under the tenant's own idempotency keys.

    Ones that exist already (an earlier run, or a fresh upload under the new version) are kept as they are.

    The new check keeps the source, the callback and the image's sha256 (so stored artifacts are found without
    fetching the image), and points back at the check it re-scores.
    """
    if not earlier:
        return {}, set()
    now = utcnow()
    rows = [
        queued_check(
            now,
            external_id=check.external_id,
            pipeline_version_id=version_id,
            source=check.source,
            callback_url=check.callback_url,
            image_sha256=check.image_sha256,
            priority=Priority.rescore,
            rescore_of=check.id,
            tenant_id=check.tenant_id,
        )
        for check in earlier
    ]
    found, made = {}, set()
    for tenant_id in sorted({row["tenant_id"] for row in rows}):
        of_tenant = [row for row in rows if row["tenant_id"] == tenant_id]
        tenant_found, created = file_rows(session, version_id, of_tenant, tenant_id=tenant_id)
        found |= {(tenant_id, external_id): check for external_id, check in tenant_found.items()}
        made |= {tenant_found[external_id].id for external_id in created}
    return found, made


def rescore_progress(
    session: Session, *, version_id: str, selection: RescoreSelection, through: str | None = None
) -> dict[tuple[str, str | None, str | None], int]:
    """How one re-score run stands: (status, earlier verdict, new verdict) → how many. One aggregate query.

    A run's re-scores are the re-score checks (`priority` rescore) under `version_id` of the checks `selection`
    takes, found by joining each to the check it re-scores (`rescore_of`), whose verdict comes along for free;
    a fresh upload under the version is none, whatever its external id. `through` keeps those of external ids
    up to the run's last page (pages go by external id). An ids selection's ids go as one parameter, however
    many: an IN (...) list of a million would not fit a statement.

    A run over most of the table reads all of it (on PostgreSQL, a parallel hash join of two scans: about
    0.1 s for 100k re-scores, seconds for a million); a narrow one (a limit, an ids file, a small version) goes
    by index: the (external id, version) key or `rescore_of`.
    """
    rescore = aliased(CheckRow)
    query = (
        sa.select(rescore.status, CheckRow.verdict, rescore.verdict, sa.func.count())
        .join(rescore, rescore.rescore_of == CheckRow.id)
        .where(rescore.pipeline_version_id == version_id, rescore.priority == Priority.rescore)
        .where(*replace(selection, external_ids=None).conditions())
        .group_by(rescore.status, CheckRow.verdict, rescore.verdict)
    )
    if through is not None:
        query = query.where(rescore.external_id <= through)
    ids = selection.external_ids
    if ids is not None and session.get_bind().dialect.name == "postgresql":
        query = query.where(rescore.external_id == sa.any_(sa.bindparam("ids", list(ids), sa.ARRAY(sa.String))))
    elif ids is not None:
        listed = sa.func.json_each(sa.bindparam("ids", list(ids), sa.JSON)).table_valued("value")
        query = query.where(rescore.external_id.in_(sa.select(listed.c.value)))
    return {(status, before, after): n for status, before, after, n in session.execute(query)}
