"""A ledger that runs for a year: tables partitioned by day on PostgreSQL, idempotency keys of their own, and
indexes that leave the frequent writes HOT.

- `checks`, `check_keys`, `deliveries`, `dead_letters`, `artifacts`, `blobs`, `images` and `thumbnails` become
  `PARTITION BY RANGE` of a time column on PostgreSQL, one partition per UTC day (`worker.ledger.partitions`),
  so retention drops a day whole. A unique key of a partitioned table must hold the partition key, so each key
  gets the time column appended (`checks`: (id, created_at)), and idempotency by external id moves from the
  unique key of `checks` to `check_keys` (backfilled here from every check). SQLite keeps plain tables.
- `deliveries` and `decisions` lose their foreign key to `checks` (no unique `id` to refer to), and deliveries
  are keyed and partitioned by their check's `created_at` (`check_created_at`, backfilled).
- The (status, updated_at) index goes, and the running claim index leaves out `lease_expires_at`: renewing a
  lease then changes no indexed column. The deliverer's index holds pending deliveries only.

Converting an existing ledger copies each table into its partitioned form inside the migration's transaction:
every converted table is locked (ACCESS EXCLUSIVE) until it commits. 1,000,000 finished checks over 30 days,
each with a delivery and an image, took 105 s on PostgreSQL 15 on a 2-core AMD EPYC beside a test run
(`python -m tests.bench.bench_partition_migration --rows 1000000 --days 30`, 2026-12-06): about 100 µs a
check, so hours for a ledger of a hundred million. Stop the workers for it, as for any migration.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import timedelta

import sqlalchemy as sa
from alembic import op

from worker.ledger import partitions

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RUNNING = sa.text("status = 'running'")
_PENDING = sa.text("status = 'pending'")
_CLAIM_ORDER = ["pipeline_version_id", "priority", "created_at"]
_PLAIN_KEYS = {  # the primary key each table has unpartitioned (and gets back on downgrade)
    "checks": ["id"],
    "check_keys": ["external_id", "pipeline_version_id", "day"],
    "deliveries": ["id"],
    "dead_letters": ["id"],
    "artifacts": ["sha256", "kind", "version_hash"],
    "blobs": ["sha256"],
    "images": ["sha256"],
    "thumbnails": ["sha256"],
}
AHEAD_DAYS = 3  # partitions made ahead by the migration; workers and maintenance keep ITEM_PARTITIONS_AHEAD_DAYS


def upgrade() -> None:
    _reshape_checks()
    _reshape_deliveries()
    with op.batch_alter_table("decisions") as batch:
        batch.drop_constraint("fk_decisions_check_id_checks", type_="foreignkey")
    with op.batch_alter_table("blobs") as batch:
        batch.add_column(sa.Column("created_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(sa.text("UPDATE blobs SET created_at = CURRENT_TIMESTAMP"))
    with op.batch_alter_table("blobs") as batch:
        batch.alter_column("created_at", nullable=False)
    _create_check_keys()
    connection = op.get_bind()
    if partitions.is_partitioned(connection):
        for table, column in partitions.PARTITIONED.items():
            _partition(connection, table, column)


def _reshape_checks() -> None:
    op.create_index("ix_checks_external_id_pipeline_version_id", "checks", ["external_id", "pipeline_version_id"])
    op.drop_index("ix_checks_status_updated_at", table_name="checks")
    op.drop_index("ix_checks_claim_running", table_name="checks")
    op.create_index("ix_checks_claim_running", "checks", _CLAIM_ORDER, postgresql_where=_RUNNING, sqlite_where=_RUNNING)
    with op.batch_alter_table("checks") as batch:
        batch.drop_constraint("uq_checks_external_id_pipeline_version_id", type_="unique")


def _reshape_deliveries() -> None:
    with op.batch_alter_table("deliveries") as batch:
        batch.add_column(sa.Column("check_created_at", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        sa.text(
            "UPDATE deliveries SET check_created_at = "
            "(SELECT checks.created_at FROM checks WHERE checks.id = deliveries.check_id)"
        )
    )
    op.execute(sa.text("DELETE FROM deliveries WHERE check_created_at IS NULL"))  # of no check: nothing to send
    with op.batch_alter_table("deliveries") as batch:
        batch.alter_column("check_created_at", nullable=False)
        batch.drop_constraint("fk_deliveries_check_id_checks", type_="foreignkey")
        batch.drop_constraint("uq_deliveries_check_id_target", type_="unique")
        batch.create_unique_constraint(
            "uq_deliveries_check_id_target_check_created_at", ["check_id", "target", "check_created_at"]
        )
    op.drop_index("ix_deliveries_status_next_attempt_at", table_name="deliveries")
    op.create_index(
        "ix_deliveries_due", "deliveries", ["next_attempt_at"], postgresql_where=_PENDING, sqlite_where=_PENDING
    )


def _create_check_keys() -> None:
    op.create_table(
        "check_keys",
        sa.Column("external_id", sa.String(512), nullable=False),
        sa.Column("pipeline_version_id", sa.String(64), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("check_id", sa.String(36), nullable=False),
        sa.PrimaryKeyConstraint("external_id", "pipeline_version_id", "day", name="pk_check_keys"),
    )
    day = "date(created_at)" if op.get_bind().dialect.name == "sqlite" else "(created_at AT TIME ZONE 'UTC')::date"
    op.execute(
        sa.text(
            f"INSERT INTO check_keys (external_id, pipeline_version_id, day, check_id) "
            f"SELECT external_id, pipeline_version_id, {day}, id FROM checks"
        )
    )


def _partition(connection: sa.Connection, table: str, column: str) -> None:
    """Rebuilds `table` as `PARTITION BY RANGE (column)` with a partition per day its rows span (and a few
    ahead), the rows copied over, and its keys (the partition column appended), foreign keys and indexes as
    they were."""
    constraints, indexes = _definitions(connection, table)
    op.execute(f'ALTER TABLE "{table}" RENAME TO "{table}__plain"')
    op.execute(f'CREATE TABLE "{table}" (LIKE "{table}__plain" INCLUDING DEFAULTS) PARTITION BY RANGE ("{column}")')
    for day in _days_held(connection, f"{table}__plain", column):
        partitions.ensure_days(connection, day, day, [table])
    today = partitions.today()
    partitions.ensure_days(connection, today - timedelta(days=1), today + timedelta(days=AHEAD_DAYS), [table])
    partitions.ensure_default(connection, table)
    op.execute(f'INSERT INTO "{table}" SELECT * FROM "{table}__plain"')
    op.execute(f'DROP TABLE "{table}__plain"')
    for name, kind, columns, definition in constraints:
        if kind in ("p", "u") and column not in columns:
            definition = definition.replace(")", f', "{column}")', 1)  # PRIMARY KEY (a, b) → (a, b, "column")
        op.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" {definition}')
    for definition in indexes:
        op.execute(definition)


def _definitions(connection: sa.Connection, table: str) -> tuple[list[tuple[str, str, list[str], str]], list[str]]:
    """`table`'s constraints (name, kind, columns, definition) and the CREATE INDEX of its other indexes."""
    constraints = connection.execute(
        sa.text(
            "SELECT c.conname, c.contype, "
            "ARRAY(SELECT a.attname FROM pg_attribute a WHERE a.attrelid = c.conrelid AND a.attnum = ANY(c.conkey)), "
            "pg_get_constraintdef(c.oid) FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid "
            "WHERE t.relname = :table AND c.contype IN ('p', 'u', 'f') ORDER BY c.contype DESC, c.conname"
        ),
        {"table": table},
    ).all()
    indexes = connection.execute(
        sa.text(
            "SELECT indexdef FROM pg_indexes WHERE tablename = :table AND indexname NOT IN "
            "(SELECT conname FROM pg_constraint c JOIN pg_class t ON t.oid = c.conrelid WHERE t.relname = :table)"
        ),
        {"table": table},
    ).scalars()
    return [tuple(row) for row in constraints], list(indexes)


def _days_held(connection: sa.Connection, table: str, column: str) -> list:
    """The days `table`'s rows fall on: each gets a partition (a day with no row needs none)."""
    day = f'"{column}"' if column == "day" else f"(\"{column}\" AT TIME ZONE 'UTC')::date"
    return list(connection.execute(sa.text(f'SELECT DISTINCT {day} FROM "{table}" ORDER BY 1')).scalars())


def downgrade() -> None:
    connection = op.get_bind()
    if partitions.is_partitioned(connection):
        for table, column in reversed(partitions.PARTITIONED.items()):
            _unpartition(connection, table, column)
    op.drop_table("check_keys")
    with op.batch_alter_table("blobs") as batch:
        batch.drop_column("created_at")
    with op.batch_alter_table("decisions") as batch:
        batch.create_foreign_key("fk_decisions_check_id_checks", "checks", ["check_id"], ["id"])
    op.drop_index("ix_deliveries_due", table_name="deliveries")
    op.create_index("ix_deliveries_status_next_attempt_at", "deliveries", ["status", "next_attempt_at"])
    with op.batch_alter_table("deliveries") as batch:
        batch.drop_constraint("uq_deliveries_check_id_target_check_created_at", type_="unique")
        batch.create_unique_constraint("uq_deliveries_check_id_target", ["check_id", "target"])
        batch.create_foreign_key("fk_deliveries_check_id_checks", "checks", ["check_id"], ["id"])
        batch.drop_column("check_created_at")
    with op.batch_alter_table("checks") as batch:
        batch.create_unique_constraint(
            "uq_checks_external_id_pipeline_version_id", ["external_id", "pipeline_version_id"]
        )
    op.drop_index("ix_checks_claim_running", table_name="checks")
    op.create_index(
        "ix_checks_claim_running", "checks", [*_CLAIM_ORDER, "lease_expires_at"], postgresql_where=_RUNNING,
        sqlite_where=_RUNNING,
    )  # fmt: skip
    op.create_index("ix_checks_status_updated_at", "checks", ["status", "updated_at"])
    op.drop_index("ix_checks_external_id_pipeline_version_id", table_name="checks")


def _unpartition(connection: sa.Connection, table: str, column: str) -> None:
    """`_partition` undone: a plain table with its unpartitioned primary key. Rows kept twice in different days
    (the same bytes stored again on a later day) are kept once, the latest."""
    constraints, indexes = _definitions(connection, table)
    key = ", ".join(f'"{name}"' for name in _PLAIN_KEYS[table])
    op.execute(f'CREATE TABLE "{table}__plain" (LIKE "{table}" INCLUDING DEFAULTS)')
    op.execute(
        f'INSERT INTO "{table}__plain" SELECT DISTINCT ON ({key}) * FROM "{table}" ORDER BY {key}, "{column}" DESC'
    )
    op.execute(f'DROP TABLE "{table}"')
    op.execute(f'ALTER TABLE "{table}__plain" RENAME TO "{table}"')
    for name, kind, _columns, definition in constraints:
        if kind == "p":
            definition = f"PRIMARY KEY ({key})"
        op.execute(f'ALTER TABLE "{table}" ADD CONSTRAINT "{name}" {definition}')
    for definition in indexes:
        op.execute(definition)
