"""Daily partitions of the tables that grow with traffic (PostgreSQL only; SQLite keeps plain tables).

Each table in PARTITIONED is declared `PARTITION BY RANGE (<time column>)` (migration 0009) and holds one
partition per UTC day, named `<table>_pYYYYMMDD`. Partitions are made ahead of time (`ensure_days`) by the
migration, by every worker at start and by the maintenance run, so no insert ever waits for one or finds none;
a day past its retention goes whole (`drop_day`): one catalog change instead of a DELETE of its rows.

Each table also has a default partition, `<table>_default`, which holds a row of a day with no partition of its
own: a delivery of a check made before its deliveries' days were dropped, a row written while maintenance was
down. Inserts then never fail for want of a day; maintenance deletes that partition's expired rows (a DELETE,
but of the few rows it ever holds). A day's partition is not made while the default one holds rows of that day.

Both statements take a brief ACCESS EXCLUSIVE lock on the parent table. They run under a short lock timeout,
so a long reader delays maintenance (which tries again on its next run) rather than every writer queueing
behind it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta

import sqlalchemy as sa

# table → the column its days are taken from
PARTITIONED: dict[str, str] = {
    "checks": "created_at",
    "check_keys": "day",
    "deliveries": "check_created_at",
    "dead_letters": "received_at",
    "artifacts": "created_at",
    "blobs": "created_at",
    "images": "created_at",
    "thumbnails": "created_at",
}
# Room left on each page of a check's partition: a claim, a lease renewal and the result can then be written as
# HOT updates on the same page (no new index entries), which keeps the claim indexes free of dead entries.
FILLFACTOR = {"checks": 80}
LOCK_TIMEOUT_MS = 2_000
_PARTITION = re.compile(r"^(?P<table>[a-z_]+)_p(?P<day>\d{8})$")
_DEFAULT = re.compile(r"^(?P<table>[a-z_]+)_default$")


def is_partitioned(connection: sa.Connection) -> bool:
    return connection.dialect.name == "postgresql"


def partition_name(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def default_name(table: str) -> str:
    return f"{table}_default"


def is_partition_name(name: str) -> bool:
    """Whether `name` is a partition (schema comparisons leave them out: the models describe parents)."""
    match = _PARTITION.match(name) or _DEFAULT.match(name)
    return bool(match) and match["table"] in PARTITIONED


def today() -> date:
    return datetime.now(UTC).date()


def day_start(day: date) -> datetime:
    return datetime.combine(day, time(), UTC)


def partition_days(connection: sa.Connection, table: str) -> list[date]:
    """The days `table` has a partition for, oldest first."""
    names = connection.execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = :table"
        ),
        {"table": table},
    ).scalars()
    days = [datetime.strptime(match["day"], "%Y%m%d").date() for name in names if (match := _PARTITION.match(name))]
    return sorted(days)


def ensure_days(connection: sa.Connection, first: date, last: date, tables: Iterable[str] = PARTITIONED) -> list[str]:
    """Makes every missing partition of `tables` for the days `first`..`last`; returns the names it made."""
    made = []
    for table in tables:
        have = set(partition_days(connection, table))
        for offset in range((last - first).days + 1):
            day = first + timedelta(days=offset)
            if day not in have:
                _create(connection, table, day)
                made.append(partition_name(table, day))
    return made


def _create(connection: sa.Connection, table: str, day: date) -> None:
    low, high = _bound(table, day), _bound(table, day + timedelta(days=1))
    if _default_holds(connection, table, low, high):
        return  # its rows stay in the default partition, deleted there when they expire
    _with_lock_timeout(connection)
    connection.exec_driver_sql(
        f'CREATE TABLE IF NOT EXISTS "{partition_name(table, day)}" PARTITION OF "{table}" '
        f"FOR VALUES FROM ('{low}') TO ('{high}'){_storage(table)}"
    )


def ensure_default(connection: sa.Connection, table: str) -> None:
    connection.exec_driver_sql(
        f'CREATE TABLE IF NOT EXISTS "{default_name(table)}" PARTITION OF "{table}" DEFAULT{_storage(table)}'
    )


def _default_holds(connection: sa.Connection, table: str, low: str, high: str) -> bool:
    column, default = PARTITIONED[table], default_name(table)
    exists = connection.exec_driver_sql("SELECT to_regclass(%(name)s) IS NOT NULL", {"name": default}).scalar()
    if not exists:
        return False
    query = f'SELECT 1 FROM "{default}" WHERE "{column}" >= %(low)s AND "{column}" < %(high)s LIMIT 1'
    return connection.exec_driver_sql(query, {"low": low, "high": high}).first() is not None


def delete_expired_defaults(connection: sa.Connection, table: str, before: date) -> int:
    """Deletes the default partition's rows of days before `before`; returns how many."""
    column = PARTITIONED[table]
    statement = f'DELETE FROM "{default_name(table)}" WHERE "{column}" < %(before)s'
    return connection.exec_driver_sql(statement, {"before": _bound(table, before)}).rowcount or 0


def _storage(table: str) -> str:
    return f" WITH (fillfactor = {FILLFACTOR[table]})" if table in FILLFACTOR else ""


def drop_day(connection: sa.Connection, table: str, day: date) -> None:
    _with_lock_timeout(connection)
    connection.exec_driver_sql(f'DROP TABLE IF EXISTS "{partition_name(table, day)}"')


def _bound(table: str, day: date) -> str:
    """A partition bound as SQL text: a date for `check_keys.day`, else the UTC midnight of `day`."""
    return day.isoformat() if PARTITIONED[table] == "day" else f"{day.isoformat()} 00:00:00+00"


def _with_lock_timeout(connection: sa.Connection) -> None:
    connection.exec_driver_sql(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
