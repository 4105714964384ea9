"""What the ledger keeps, and the maintenance that keeps it so (`item db maintain`, and the reconciler's
periodic run).

Every table that grows with traffic has a retention in whole UTC days (ITEM_RETAIN_*_DAYS). On PostgreSQL a
day past it goes as one partition (`partitions.drop_day`), so dropping a day costs the same at a thousand
rows as at a hundred million; partitions for the next ITEM_PARTITIONS_AHEAD_DAYS days are made first. SQLite
(the embedded default) deletes the same rows in bounded batches.

Checks are the audit trail: a day of them is written to ITEM_ARCHIVE_DIR (`archive.export_day`) before it is
dropped, never dropped without an archive, and never while one of them is unfinished.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger import archive, near, partitions, review_queue, rollups
from worker.ledger.models import CheckRow
from worker.ledger.states import CheckStatus

log = logging.getLogger("item.retention")

DELETE_BATCH = 5_000  # SQLite: rows per DELETE, so one transaction never holds the file for long
ROLLUP_KEEP = timedelta(days=400)  # the operator views' per-minute counts: small, kept over a year


@dataclass(frozen=True)
class Policy:
    """Days kept per partitioned table, where checks are archived, and how far ahead partitions are made."""

    days: dict[str, int]
    archive_dir: Path | None
    ahead_days: int = 3

    @classmethod
    def from_settings(cls, settings) -> Policy:
        days = {
            "checks": settings.retain_checks_days,
            "check_keys": settings.retain_keys_days,
            "deliveries": settings.retain_deliveries_days,
            "dead_letters": settings.retain_dead_letters_days,
            "artifacts": settings.retain_artifacts_days,
            "blobs": settings.retain_blobs_days,
            "images": settings.retain_images_days,
            "thumbnails": math.ceil(settings.thumbnail_retention_days),
            # never past the checks' own: an item whose check was dropped has nothing left to review
            "review_items": min(settings.retain_reviews_days or 30, settings.retain_checks_days),
            "near_hashes": settings.retain_checks_days,  # an entry answers only while its check can be read
        }
        return cls(days, settings.archive_dir, settings.partitions_ahead_days)

    def expired_before(self, table: str, today: date) -> date:
        """The first day of `table` still kept: every day before it is past its retention."""
        return today - timedelta(days=self.days[table])


@dataclass
class Report:
    """What one maintenance run did (or, with `dry_run`, would do)."""

    made: list[str] = field(default_factory=list)  # partitions made ahead
    dropped: list[str] = field(default_factory=list)  # "<table> <day>": a day dropped (or its rows deleted)
    archived: list[str] = field(default_factory=list)  # archive files written
    kept: list[str] = field(default_factory=list)  # "<table> <day>: why" for an expired day not dropped
    rows_deleted: int = 0  # SQLite's rows, and the few of PostgreSQL's default partitions (see `partitions`)
    review_items_deleted: int = 0  # reviewed, or queued past their retention (see `review_queue.purge`)
    near_hashes_deleted: int = 0  # near-copy index entries past their checks' retention (see `near.purge`)

    def to_dict(self) -> dict:
        return {
            "made": self.made,
            "dropped": self.dropped,
            "archived": self.archived,
            "kept": self.kept,
            "rows_deleted": self.rows_deleted,
            "review_items_deleted": self.review_items_deleted,
            "near_hashes_deleted": self.near_hashes_deleted,
        }


def ensure_partitions(engine: sa.Engine, ahead_days: int) -> list[str]:
    """Makes the partitions of yesterday through `ahead_days` from today (PostgreSQL; nothing on SQLite)."""
    with engine.begin() as connection:
        if not partitions.is_partitioned(connection):
            return []
        today = partitions.today()
        return partitions.ensure_days(connection, today - timedelta(days=1), today + timedelta(days=ahead_days))


def maintain(
    engine: sa.Engine, policy: Policy, *, dry_run: bool = False, progress: Callable[[str], None] = log.info
) -> Report:
    """Makes partitions ahead, then drops (or deletes) every day past its retention, checks archived first."""
    report = Report()
    today = partitions.today()
    postgres = engine.dialect.name == "postgresql"
    if postgres and not dry_run:
        report.made = ensure_partitions(engine, policy.ahead_days)
    for table in partitions.PARTITIONED:
        cutoff = policy.expired_before(table, today)
        days = _partition_days(engine, table) if postgres else _row_days(engine, table, cutoff)
        for day in (day for day in days if day < cutoff):
            progress(_expire_day(engine, policy, table, day, report, dry_run=dry_run))
        if postgres and not dry_run and table != "checks":  # checks are never deleted unarchived: see _expire_day
            with engine.begin() as connection:
                report.rows_deleted += partitions.delete_expired_defaults(connection, table, cutoff)
    if not dry_run:
        with Session(engine) as session, session.begin():
            rollups.prune_rollups(session, older_than=ROLLUP_KEEP)
        report.review_items_deleted = _purge(engine, review_queue.purge, policy.days.get("review_items", 30))
        report.near_hashes_deleted = _purge(engine, near.purge, policy.days.get("near_hashes", 90))
    return report


def _purge(engine: sa.Engine, purge: Callable[[Session, timedelta, int], int], days: int) -> int:
    """What `purge` deletes of rows past `days`: review items (reviewed, or queued too long), near-copy entries; a
    bounded DELETE per transaction, through the table's own index."""
    deleted = 0
    while True:
        with Session(engine) as session, session.begin():
            count = purge(session, timedelta(days=days), DELETE_BATCH)
        deleted += count
        if count < DELETE_BATCH:
            return deleted


def _expire_day(engine: sa.Engine, policy: Policy, table: str, day: date, report: Report, *, dry_run: bool) -> str:
    """Drops (or deletes) one expired day of `table`, checks archived first; says what it did."""
    label = f"{table} {day}"
    if table == "checks":
        why_not = _why_checks_stay(engine, policy, day)
        if why_not:
            report.kept.append(f"{label}: {why_not}")
            return report.kept[-1]
        if not dry_run:
            report.archived.append(str(archive.export_day(engine, policy.archive_dir, day)))
    if not dry_run:
        if engine.dialect.name == "postgresql":
            with engine.begin() as connection:
                partitions.drop_day(connection, table, day)
        else:
            report.rows_deleted += _delete_day(engine, table, day)
    report.dropped.append(label)
    return f"{label}: {'would drop' if dry_run else 'dropped'}"


def _why_checks_stay(engine: sa.Engine, policy: Policy, day: date) -> str | None:
    if policy.archive_dir is None:
        return "no ITEM_ARCHIVE_DIR: checks are dropped only once archived"
    unfinished = sa.select(CheckRow.id).where(
        *archive.made_on(day), CheckRow.status.in_([CheckStatus.queued, CheckStatus.running])
    )
    with engine.connect() as connection:
        if connection.execute(unfinished.limit(1)).first() is not None:
            return "unfinished checks (queued or running) were made that day"
    return None


def _partition_days(engine: sa.Engine, table: str) -> list[date]:
    with engine.connect() as connection:
        return partitions.partition_days(connection, table)


def _time_column(table: str) -> sa.ColumnClause:
    return sa.column(partitions.PARTITIONED[table])


def _row_days(engine: sa.Engine, table: str, before: date) -> list[date]:
    """SQLite: the days before `before` that hold rows of `table` (read through its time column)."""
    column = _time_column(table)
    query = (
        sa.select(sa.func.distinct(sa.func.date(column))).select_from(sa.table(table)).where(column < _bound(before))
    )
    with engine.connect() as connection:
        return sorted(date.fromisoformat(value) for value in connection.execute(query).scalars() if value)


def _delete_day(engine: sa.Engine, table: str, day: date) -> int:
    """SQLite: deletes `table`'s rows of `day`, DELETE_BATCH at a time; returns how many."""
    column, rows = _time_column(table), sa.table(table, sa.column("rowid"))
    in_day = sa.and_(column >= _bound(day), column < _bound(day + timedelta(days=1)))
    deleted = 0
    while True:
        batch = sa.select(rows.c.rowid).where(in_day).limit(DELETE_BATCH).scalar_subquery()
        with engine.begin() as connection:
            count = connection.execute(sa.delete(rows).where(rows.c.rowid.in_(batch))).rowcount
        deleted += count
        if count < DELETE_BATCH:
            return deleted


def _bound(day: date) -> str:
    """A day's start as SQLite stores times (UTC text without a zone), or the day itself for `check_keys.day`."""
    return day.isoformat()
