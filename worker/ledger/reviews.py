"""What the console reads and writes beside checks: moderators' decisions, thumbnails, workers' heartbeats,
and the operations page's aggregates. Each is a few statements, whatever the number of checks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger.models import CheckRow, DecisionRow, DeliveryRow, ThumbnailRow, WorkerRow, utcnow
from worker.ledger.queries import dialect_insert, fresh, insert_many
from worker.ledger.states import CheckStatus

LABELS = ("ai_generated", "authentic", "unsure")
LATENCY_SAMPLE = 5_000  # newest finished checks the latency percentiles are computed over


# ---------------------------------------------------------------------- decisions


def record_decision(
    session: Session, check_id: str, label: str, reviewer: str, key_id: str | None, note: str | None = None
) -> DecisionRow:
    if label not in LABELS:
        raise ValueError(f"label {label!r} is not one of {', '.join(LABELS)}")
    row = DecisionRow(check_id=check_id, label=label, reviewer=reviewer, key_id=key_id, note=note, decided_at=utcnow())
    session.add(row)
    session.flush()
    return row


def decisions_of(session: Session, check_id: str) -> list[DecisionRow]:
    """Every decision on a check, newest first."""
    query = sa.select(DecisionRow).where(DecisionRow.check_id == check_id)
    return list(session.scalars(query.order_by(DecisionRow.decided_at.desc(), DecisionRow.id.desc())))


def latest_decisions(session: Session, *, since: datetime | None = None) -> Iterator[tuple[DecisionRow, CheckRow]]:
    """Each decided check with its latest decision (a later one overrides an earlier one), oldest first."""
    latest = sa.select(DecisionRow.check_id, sa.func.max(DecisionRow.decided_at).label("at")).group_by(
        DecisionRow.check_id
    )
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
    """One statement for a batch's thumbnails; bytes already thumbnailed keep theirs."""
    if not thumbnails:
        return
    now = utcnow()
    rows = [{**vars(one), "created_at": now} for one in {one.sha256: one for one in thumbnails}.values()]
    insert_many(session, ThumbnailRow, rows)


def get_thumbnail(session: Session, sha256: str) -> ThumbnailRow | None:
    return session.get(ThumbnailRow, sha256)


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


def status_counts_since(session: Session, since: datetime) -> dict[str, int]:
    """Checks filed since `since`, per status (every status present)."""
    counts = {status.value: 0 for status in CheckStatus}
    query = sa.select(CheckRow.status, sa.func.count()).where(CheckRow.created_at >= since).group_by(CheckRow.status)
    for status, n in session.execute(query):
        counts[CheckStatus(status).value] = int(n)
    return counts


def finished_since(session: Session, since: datetime) -> int:
    query = sa.select(sa.func.count()).select_from(CheckRow).where(CheckRow.finished_at >= since)
    return int(session.execute(query).scalar_one())


def latency_percentiles(session: Session, since: datetime, quantiles=(0.5, 0.9, 0.99)) -> dict[str, float | None]:
    """Seconds from filing to a result of the newest done checks since `since` (at most LATENCY_SAMPLE)."""
    query = (
        sa.select(CheckRow.created_at, CheckRow.finished_at)
        .where(CheckRow.finished_at >= since, CheckRow.status == CheckStatus.done)
        .order_by(CheckRow.finished_at.desc())
        .limit(LATENCY_SAMPLE)
    )
    seconds = sorted((done - filed).total_seconds() for filed, done in session.execute(query))
    return {f"p{round(q * 100)}": _quantile(seconds, q) for q in quantiles}


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def verdicts_per_version(session: Session, since: datetime) -> dict[str, dict[str, int]]:
    """{version: {verdict: count}} of the checks done since `since`."""
    query = (
        sa.select(CheckRow.pipeline_version_id, CheckRow.verdict, sa.func.count())
        .where(CheckRow.finished_at >= since, CheckRow.status == CheckStatus.done)
        .group_by(CheckRow.pipeline_version_id, CheckRow.verdict)
    )
    shares: dict[str, dict[str, int]] = {}
    for version_id, verdict, n in session.execute(query):
        shares.setdefault(version_id, {})[verdict or "none"] = int(n)
    return shares


def deliveries_of(session: Session, check_id: str) -> list[DeliveryRow]:
    query = sa.select(DeliveryRow).where(DeliveryRow.check_id == check_id).order_by(DeliveryRow.created_at)
    return list(session.scalars(query))


def same_upload_elsewhere(session: Session, check: CheckRow) -> list[CheckRow]:
    """The same upload (external id) under other versions, and re-scores of it: newest first, at most 20."""
    query = (
        sa.select(CheckRow)
        .where(CheckRow.external_id == check.external_id, CheckRow.id != check.id)
        .order_by(CheckRow.created_at.desc())
        .limit(20)
    )
    return list(session.scalars(query))


def rescore_counts(session: Session, version_id: str) -> dict[str, int]:
    """Re-score checks under `version_id`, per status: how far re-scoring onto it has come."""
    from worker.ledger.states import Priority

    query = (
        sa.select(CheckRow.status, sa.func.count())
        .where(CheckRow.pipeline_version_id == version_id, CheckRow.priority == Priority.rescore)
        .group_by(CheckRow.status)
    )
    return {CheckStatus(status).value: int(n) for status, n in session.execute(query)}
