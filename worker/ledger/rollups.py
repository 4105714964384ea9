"""Counts of ended checks, kept as checks end, so the operator views read a few thousand small rows however large
the ledger grows: the console's operations page, `item status`, `item versions`, the re-scores per version.

Three summaries, each written in the transaction that ends the checks it counts (`count_endings`, called by
`worker.ledger.transitions` for every check that becomes done, rejected or failed), so they are exact and never
drift:
- `check_rollups`: endings per UTC minute × tenant × version × status × verdict × priority (the windows: last
  hour, day);
- `check_totals`: the same without the minute, never pruned (all-time figures);
- `check_latency_rollups`: done checks per UTC minute × bucket of filing-to-result latency (the percentiles).

They count endings, not rows: a check that a resubmission replaces (`checks.replace_check`) keeps its earlier
ending counted, and its new ending is counted too. Each key is spread over SLOTS rows, one picked at random per
transaction, so transactions ending checks of the same minute, version and verdict at once seldom queue on one
row's lock; readers sum the slots. One slot for the whole transaction, and keys locked in sorted order: two
transactions that end checks in the same order of calls lock the rows they share in the same order, never in
a deadlock.

Latency buckets are log-spaced, BUCKETS_PER_DOUBLING to a doubling from LATENCY_FLOOR_S, so a percentile read
from them (a bucket's geometric middle) is within 9.1% of the exact one (2 ** (1 / 8) - 1), whatever the scale.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Iterable
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger.models import CheckLatencyRow, CheckRollupRow, CheckRow, CheckTotalRow, utcnow
from worker.ledger.queries import dialect_insert
from worker.ledger.states import TERMINAL_STATUSES, CheckStatus

SLOTS = 8
LATENCY_FLOOR_S = 0.01  # bucket 0 holds everything faster
BUCKETS_PER_DOUBLING = 4
LAST_BUCKET = 127  # from 0.01 s × 2 ** 31.75: over a year


def minute_of(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0)


def latency_bucket(seconds: float) -> int:
    """The bucket of a latency; the migration that backfills the rollups computes the same in SQL."""
    doublings = math.log(max(seconds, LATENCY_FLOOR_S) / LATENCY_FLOOR_S) / math.log(2)
    return min(LAST_BUCKET, math.floor(BUCKETS_PER_DOUBLING * doublings))


def bucket_seconds(bucket: int) -> float:
    """The geometric middle of a bucket: the estimate of any latency in it."""
    return LATENCY_FLOOR_S * 2 ** ((bucket + 0.5) / BUCKETS_PER_DOUBLING)


# ---------------------------------------------------------------------- writing


def count_endings(session: Session, rows: Iterable[CheckRow]) -> None:
    """Counts the checks of `rows` that ended (rows still queued or running are left out): one upsert per
    summary for the whole batch, in the caller's transaction."""
    ended = [row for row in rows if row.status in TERMINAL_STATUSES]
    if not ended:
        return
    per_minute, totals, latencies = Counter(), Counter(), Counter()
    for row in ended:
        minute = minute_of(row.finished_at or utcnow())
        outcome = (row.pipeline_version_id, CheckStatus(row.status).value, row.verdict or "", row.priority)
        per_minute[(minute, row.tenant_id, *outcome)] += 1
        totals[(row.tenant_id, *outcome)] += 1
        if row.status == CheckStatus.done and row.finished_at is not None:
            latencies[(minute, latency_bucket((row.finished_at - row.created_at).total_seconds()))] += 1
    slot = session.info.setdefault("rollup_slot", random.randrange(SLOTS))  # a Ledger session is one transaction
    for model, counts in ((CheckRollupRow, per_minute), (CheckTotalRow, totals), (CheckLatencyRow, latencies)):
        _add(session, model, counts, slot)


def _add(session: Session, model: type, counts: Counter, slot: int) -> None:
    """n += count for each key of `counts` in `slot`, inserting the rows not there yet: one statement (an
    executemany of INSERT ... ON CONFLICT DO UPDATE, sent as multi-row VALUES pages, see `insert_many`). Keys go in
    sorted order, so two transactions lock the rows they share in the same order and never deadlock."""
    if not counts:
        return
    table = model.__table__
    names = [column.name for column in table.primary_key.columns if column.name != "slot"]
    rows = [{**dict(zip(names, key, strict=True)), "slot": slot, "n": n} for key, n in sorted(counts.items())]
    insert = dialect_insert(session, table)
    statement = insert.on_conflict_do_update(
        index_elements=list(table.primary_key.columns), set_={"n": table.c.n + insert.excluded.n}
    ).returning(table.c.n)
    session.connection().execute(statement, rows).all()


# ---------------------------------------------------------------------- reading


def ended_since(
    session: Session, since: datetime, *, tenant_id: str | None = None
) -> dict[tuple[str, str, str, int], int]:
    """{(version, status, verdict, priority): checks ended} from the minute `since` falls in (of one tenant, when
    given): whole minutes, so up to 59 s before `since` count too."""
    rollup = CheckRollupRow
    outcome = (rollup.pipeline_version_id, rollup.status, rollup.verdict, rollup.priority)
    query = sa.select(*outcome, sa.func.sum(rollup.n)).where(rollup.minute >= minute_of(since)).group_by(*outcome)
    if tenant_id is not None:
        query = query.where(rollup.tenant_id == tenant_id)
    return {tuple(outcome): int(n) for *outcome, n in session.execute(query)}


def totals(
    session: Session, *, version_id: str | None = None, priority: int | None = None, tenant_id: str | None = None
) -> dict[tuple[str, str], int]:
    """{(version, status): checks ever ended}, of one version, priority and tenant when given."""
    total = CheckTotalRow
    query = sa.select(total.pipeline_version_id, total.status, sa.func.sum(total.n))
    if tenant_id is not None:
        query = query.where(total.tenant_id == tenant_id)
    if version_id is not None:
        query = query.where(total.pipeline_version_id == version_id)
    if priority is not None:
        query = query.where(total.priority == priority)
    query = query.group_by(total.pipeline_version_id, total.status)
    return {(version, status): int(n) for version, status, n in session.execute(query)}


def latency_histogram_since(session: Session, since: datetime) -> dict[int, int]:
    """{bucket: done checks} from the minute `since` falls in."""
    latency = CheckLatencyRow
    query = (
        sa.select(latency.bucket, sa.func.sum(latency.n))
        .where(latency.minute >= minute_of(since))
        .group_by(latency.bucket)
    )
    return {bucket: int(n) for bucket, n in session.execute(query)}


def percentile(histogram: dict[int, int], q: float) -> float | None:
    """The latency below which a share `q` of the histogram's checks fall (the middle of its bucket), ranked as
    the exact reader ranked sorted latencies: the one at index int(q × count)."""
    count = sum(histogram.values())
    if not count:
        return None
    rank, seen = min(count - 1, int(q * count)), 0
    for bucket in sorted(histogram):
        seen += histogram[bucket]
        if seen > rank:
            break
    return bucket_seconds(bucket)


# ---------------------------------------------------------------------- retention


def prune_rollups(session: Session, older_than: timedelta) -> int:
    """Deletes the per-minute rows of minutes older than `older_than` (the all-time totals stay); returns how
    many. A day is at most 1,440 minutes × the keys in use × SLOTS rows, so a DELETE is enough."""
    before = minute_of(utcnow() - older_than)
    deleted = 0
    for model in (CheckRollupRow, CheckLatencyRow):
        deleted += session.execute(sa.delete(model).where(model.minute < before)).rowcount or 0
    return deleted
