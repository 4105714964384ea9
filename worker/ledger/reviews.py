"""What the console reads and writes beside checks: moderators' decisions, thumbnails, workers' heartbeats,
and the operations page's aggregates. Each is a few statements, whatever the number of checks: the aggregates
read the rollups (`worker.ledger.rollups`) and the claim indexes, never the rows of finished checks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger import listing, rollups
from worker.ledger.images import stored_today
from worker.ledger.models import DEFAULT_TENANT, CheckRow, DecisionRow, DeliveryRow, ThumbnailRow, WorkerRow, utcnow
from worker.ledger.queries import dialect_insert, fresh, insert_many
from worker.ledger.review_queue import LABELS, count_decision, feed_bank  # LABELS: what a moderator decides
from worker.ledger.states import CheckStatus, Priority

# ---------------------------------------------------------------------- decisions


def record_decision(
    session: Session,
    check_id: str,
    label: str,
    reviewer: str,
    key_id: str | None,
    note: str | None = None,
    *,
    tenant_id: str = DEFAULT_TENANT,
) -> DecisionRow:
    """A moderator's decision on a check; `tenant_id` is the check's (a decision belongs to its check's tenant)."""
    if label not in LABELS:
        raise ValueError(f"label {label!r} is not one of {', '.join(LABELS)}")
    row = DecisionRow(
        check_id=check_id, label=label, reviewer=reviewer, key_id=key_id, note=note, decided_at=utcnow(),
        tenant_id=tenant_id,
    )  # fmt: skip
    session.add(row)
    session.flush()
    count_decision(session, check_id, key_id)  # a decision outside the review queue counts in it too
    feed_bank(session, row)
    return row


def decisions_of(session: Session, check_id: str, *, tenant_id: str | None = None) -> list[DecisionRow]:
    """Every decision on a check (of `tenant_id`'s, when given), newest first."""
    query = sa.select(DecisionRow).where(DecisionRow.check_id == check_id)
    if tenant_id is not None:
        query = query.where(DecisionRow.tenant_id == tenant_id)
    return list(session.scalars(query.order_by(DecisionRow.decided_at.desc(), DecisionRow.id.desc())))


def latest_decisions(
    session: Session, *, since: datetime | None = None, tenant_id: str | None = None
) -> Iterator[tuple[DecisionRow, CheckRow]]:
    """Each decided check with its latest decision (a later one overrides an earlier one), oldest first; of one
    tenant's checks when given."""
    latest = sa.select(DecisionRow.check_id, sa.func.max(DecisionRow.decided_at).label("at")).group_by(
        DecisionRow.check_id
    )
    if tenant_id is not None:
        latest = latest.where(DecisionRow.tenant_id == tenant_id)
    if since is not None:
        latest = latest.having(sa.func.max(DecisionRow.decided_at) >= since)
    latest = latest.subquery()
    query = (
        sa.select(DecisionRow, CheckRow)
        .join(latest, sa.and_(latest.c.check_id == DecisionRow.check_id, latest.c.at == DecisionRow.decided_at))
        .join(CheckRow, CheckRow.id == DecisionRow.check_id)
        .order_by(DecisionRow.decided_at, DecisionRow.id)
    )
    seen = set()
    for decision, check in session.execute(query.execution_options(yield_per=500)):
        if check.id not in seen:  # two decisions in the same microsecond: one of them
            seen.add(check.id)
            yield decision, check


# ---------------------------------------------------------------------- thumbnails


@dataclass(frozen=True)
class Thumbnail:
    sha256: str
    data: bytes  # JPEG
    width: int
    height: int


def put_thumbnails(session: Session, thumbnails: list[Thumbnail]) -> None:
    """One statement for a batch's thumbnails; bytes already thumbnailed today keep theirs.

    Kept by last use: an image decoded again on a later day gets a copy in that day's partition (see
    `images.stored_today`), so ITEM_THUMBNAIL_RETENTION_DAYS counts from the last time it was seen.
    """
    if not thumbnails:
        return
    today = stored_today()
    rows = [{**vars(one), "created_at": today} for one in {one.sha256: one for one in thumbnails}.values()]
    insert_many(session, ThumbnailRow, rows)


def kept_thumbnails(session: Session, check: CheckRow) -> set[str]:
    """The keys of a video's sampled frames whose thumbnails are kept (their keys read, not their bytes): a page
    draws the others as a placeholder rather than a broken image."""
    keys = [frame["sha256"] for frame in (check.media or {}).get("frames") or []]
    if not keys:
        return set()
    return set(session.scalars(sa.select(ThumbnailRow.sha256).where(ThumbnailRow.sha256.in_(keys))))


def get_thumbnail(session: Session, sha256: str) -> ThumbnailRow | None:
    query = sa.select(ThumbnailRow).where(ThumbnailRow.sha256 == sha256).order_by(ThumbnailRow.created_at.desc())
    return session.scalars(query.limit(1)).first()


def purge_thumbnails(session: Session, older_than: timedelta) -> int:
    result = session.execute(sa.delete(ThumbnailRow).where(ThumbnailRow.created_at < utcnow() - older_than))
    return result.rowcount or 0


# ---------------------------------------------------------------------- workers


def heartbeat(session: Session, owner: str, version_id: str, started_at: datetime) -> None:
    now = utcnow()
    row = {"owner": owner, "pipeline_version_id": version_id, "started_at": started_at, "seen_at": now}
    statement = dialect_insert(session, WorkerRow).values(row)
    session.execute(statement.on_conflict_do_update(index_elements=["owner"], set_={"seen_at": now}))


def worker_gone(session: Session, owner: str) -> None:
    session.execute(sa.delete(WorkerRow).where(WorkerRow.owner == owner))


def forget_workers(session: Session, older_than: timedelta) -> int:
    """Deletes the rows of workers silent for `older_than`: killed ones, which could not delete their own."""
    return session.execute(sa.delete(WorkerRow).where(WorkerRow.seen_at < utcnow() - older_than)).rowcount or 0


def workers_seen(session: Session, within: timedelta) -> list[WorkerRow]:
    """Workers whose heartbeat is at most `within` old."""
    query = sa.select(WorkerRow).where(WorkerRow.seen_at >= utcnow() - within).order_by(WorkerRow.owner)
    return list(session.scalars(fresh(query)))


# ---------------------------------------------------------------------- the operations page


def status_counts_since(session: Session, since: datetime, *, tenant_id: str | None = None) -> dict[str, int]:
    """Per status, every status present: the checks that ended since `since` (whole minutes: see
    `rollups.ended_since`), and the checks queued and running now (each up to COUNT_CAP); of one tenant when
    given."""
    counts = {status.value: 0 for status in CheckStatus}
    for (_, status, _, _), n in rollups.ended_since(session, since, tenant_id=tenant_id).items():
        counts[status] += n
    return counts | listing.count_unfinished(session, tenant_id=tenant_id)


def finished_since(session: Session, since: datetime, *, tenant_id: str | None = None) -> int:
    """Checks that ended (done, rejected or failed) since `since`, in whole minutes; of one tenant when given."""
    return sum(rollups.ended_since(session, since, tenant_id=tenant_id).values())


def latency_percentiles(session: Session, since: datetime, quantiles=(0.5, 0.9, 0.99)) -> dict[str, float | None]:
    """Seconds from filing to a result of the checks done since `since` (all of them, in whole minutes), each
    within 9.1% of the exact percentile (see `rollups.percentile`)."""
    histogram = rollups.latency_histogram_since(session, since)
    return {f"p{round(q * 100)}": rollups.percentile(histogram, q) for q in quantiles}


def verdicts_per_version(
    session: Session, since: datetime, *, tenant_id: str | None = None
) -> dict[str, dict[str, int]]:
    """{version: {verdict: count}} of the checks done since `since`, in whole minutes; of one tenant when given."""
    shares: dict[str, dict[str, int]] = {}
    for (version_id, status, verdict, _), n in rollups.ended_since(session, since, tenant_id=tenant_id).items():
        if status == CheckStatus.done:
            by_verdict = shares.setdefault(version_id, {})
            by_verdict[verdict or "none"] = by_verdict.get(verdict or "none", 0) + n
    return shares


def deliveries_of(session: Session, check_id: str, *, tenant_id: str | None = None) -> list[DeliveryRow]:
    """The deliveries of a check's result (of `tenant_id`'s, when given), oldest first."""
    query = sa.select(DeliveryRow).where(DeliveryRow.check_id == check_id).order_by(DeliveryRow.created_at)
    if tenant_id is not None:
        query = query.where(DeliveryRow.tenant_id == tenant_id)
    return list(session.scalars(query))


def same_upload_elsewhere(session: Session, check: CheckRow) -> list[CheckRow]:
    """The same upload (external id, of the check's own tenant: another platform's id of the same spelling is
    another upload) under other versions, and re-scores of it: newest first, at most 20."""
    query = (
        sa.select(CheckRow)
        .where(
            CheckRow.external_id == check.external_id, CheckRow.tenant_id == check.tenant_id, CheckRow.id != check.id
        )
        .order_by(CheckRow.created_at.desc())
        .limit(20)
    )
    return list(session.scalars(query))


def rescore_counts(session: Session, version_id: str, *, tenant_id: str | None = None) -> dict[str, int]:
    """Re-score checks under `version_id`, per status they have any in: how far re-scoring onto it has come
    (ended ones from the rollups' totals, queued and running ones now, each up to COUNT_CAP); of one tenant when
    given."""
    ended = rollups.totals(session, version_id=version_id, priority=Priority.rescore, tenant_id=tenant_id)
    counts = {status: n for (_, status), n in ended.items()}
    narrowed = {"version_id": version_id, "priority": Priority.rescore, "tenant_id": tenant_id}
    counts |= listing.count_unfinished(session, **narrowed)
    return {status.value: counts[status.value] for status in CheckStatus if counts.get(status.value)}
