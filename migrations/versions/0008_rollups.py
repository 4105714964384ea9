"""Operator views that do not read `checks`: rollups of ended checks, and the duplicate-bytes lookup by index.

- `check_rollups` (endings per UTC minute × version × status × verdict × priority × slot), `check_totals` (the
  same without the minute) and `check_latency_rollups` (done checks per minute × latency bucket), kept by
  `worker.ledger.rollups` as checks end, and backfilled here from the checks already ended: one INSERT ...
  SELECT ... GROUP BY over `checks` for each per-minute table, the totals summed from the minutes. A terminal
  check without `finished_at` (none is written so; only hand-made rows) counts at its `updated_at`.
- `ix_checks_image_sha256` (every check of some bytes) becomes `ix_checks_done_by_image`, partial to done
  checks and in the lookup's order, so answering duplicate bytes reads one entry per image.

Measured on PostgreSQL 15 on this project's 2-core AMD EPYC machine (2026-12-06) with 1,000,000 ended checks
spread over a day (generate_series, 800,000 done): the upgrade took 8.6 s — the per-minute backfills 1.9 s each
(23,056 and 27,177 rows made), the totals a few ms, the new index 3.4 s. Reads of `checks` go on throughout;
writes wait from the index build to the commit (its SHARE lock, about 4 s), and the last statement, dropping
the old index, holds the table exclusively for the instant before the commit. Stop the workers for it, as for
any migration.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)
_DONE = sa.text("status = 'done'")
_ENDED = "status IN ('done', 'rejected', 'failed')"
# `worker.ledger.rollups.latency_bucket` in SQL: floor(4 × log2(seconds / 0.01)), from 0 to 127.
_BUCKET = "{least}(127, floor(4 * ln({greatest}({seconds}, 0.01) / 0.01) / ln(2)))"
_SQL = {  # per dialect: the minute a check ended in (as the ledger stores times), its latency in seconds
    "postgresql": {
        "minute": "date_trunc('minute', coalesce(finished_at, updated_at) AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'",
        "seconds": "extract(epoch FROM finished_at - created_at)::float8",
        "least": "least",
        "greatest": "greatest",
    },
    "sqlite": {
        "minute": "strftime('%Y-%m-%d %H:%M:00.000000', coalesce(finished_at, updated_at))",
        "seconds": "(julianday(finished_at) - julianday(created_at)) * 86400.0",
        "least": "min",
        "greatest": "max",
    },
}


def upgrade() -> None:
    _create_tables()
    _backfill()
    op.create_index(
        "ix_checks_done_by_image",
        "checks",
        ["image_sha256", "pipeline_version_id", "finished_at", "id"],
        postgresql_where=_DONE,
        sqlite_where=_DONE,
    )
    op.drop_index("ix_checks_image_sha256", table_name="checks")


def downgrade() -> None:
    op.create_index("ix_checks_image_sha256", "checks", ["image_sha256"])
    op.drop_index("ix_checks_done_by_image", table_name="checks")
    for table in ("check_latency_rollups", "check_totals", "check_rollups"):
        op.drop_table(table)


def _outcome_columns() -> list[sa.Column]:
    return [
        sa.Column("pipeline_version_id", sa.String(64), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("verdict", sa.String(16), nullable=False),
        sa.Column("priority", sa.SmallInteger(), nullable=False),
        sa.Column("slot", sa.SmallInteger(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
    ]


def _create_tables() -> None:
    outcome = ["pipeline_version_id", "status", "verdict", "priority", "slot"]
    op.create_table(
        "check_rollups",
        sa.Column("minute", _TIME, nullable=False),
        *_outcome_columns(),
        sa.PrimaryKeyConstraint("minute", *outcome, name="pk_check_rollups"),
    )
    op.create_table("check_totals", *_outcome_columns(), sa.PrimaryKeyConstraint(*outcome, name="pk_check_totals"))
    op.create_table(
        "check_latency_rollups",
        sa.Column("minute", _TIME, nullable=False),
        sa.Column("bucket", sa.SmallInteger(), nullable=False),
        sa.Column("slot", sa.SmallInteger(), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("minute", "bucket", "slot", name="pk_check_latency_rollups"),
    )


def _backfill() -> None:
    bind = op.get_bind()
    sql = _SQL[bind.dialect.name]
    if bind.dialect.name == "sqlite":
        _provide_sqlite_math(bind)
    bucket = _BUCKET.format(**sql)
    op.execute(
        f"INSERT INTO check_rollups (minute, pipeline_version_id, status, verdict, priority, slot, n) "
        f"SELECT {sql['minute']}, pipeline_version_id, status, coalesce(verdict, ''), priority, 0, count(*) "
        f"FROM checks WHERE {_ENDED} GROUP BY 1, 2, 3, 4, 5"
    )
    op.execute(
        "INSERT INTO check_totals (pipeline_version_id, status, verdict, priority, slot, n) "
        "SELECT pipeline_version_id, status, verdict, priority, 0, sum(n) FROM check_rollups GROUP BY 1, 2, 3, 4"
    )
    op.execute(
        f"INSERT INTO check_latency_rollups (minute, bucket, slot, n) "
        f"SELECT {sql['minute']}, {bucket}, 0, count(*) "
        f"FROM checks WHERE status = 'done' AND finished_at IS NOT NULL GROUP BY 1, 2"
    )


def _provide_sqlite_math(bind: sa.Connection) -> None:
    """SQLite has ln() and floor() only when built with its math functions (most builds are): else Python's."""
    try:
        bind.exec_driver_sql("SELECT ln(1), floor(1)")
    except sa.exc.OperationalError:
        connection = bind.connection.driver_connection
        connection.create_function("ln", 1, math.log, deterministic=True)
        connection.create_function("floor", 1, math.floor, deterministic=True)
