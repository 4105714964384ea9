"""Many platforms on one deployment: tenants, their quotas and callback secrets, and a review queue.

- `tenants` (seeded with `default`), `tenant_buckets` (each tenant's token bucket), `callback_secrets` (per tenant,
  with a rotation window) and `review_items` (the moderators' queue, taken under leases) are new.
- `checks`, `deliveries`, `decisions`, `check_rollups` and `check_totals` get a `tenant_id` (every existing row is
  `default`'s); `dead_letters` and `api_keys` a nullable one (an API key without one is an operator key that sees
  every tenant: existing keys are given `default`, so they see exactly what they saw).
- Idempotency becomes per tenant: `check_keys` gets `tenant_id` in its key.
- The claim indexes lead with `tenant_id`, so a fair claim reads each tenant's oldest checks from its own range.

On PostgreSQL adding a column with a constant default is a change of the catalogue only (no table rewrite), also
on the partitioned tables; the index builds read every partition of `checks` (the claim indexes only its queued
and running rows; `ix_checks_tenant_id_created_at_id` all of them). Stop the workers for it, as for any migration.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)
_DEFAULT = "default"
_QUEUED = sa.text("status = 'queued'")
_RUNNING = sa.text("status = 'running'")
_OPEN_REVIEW = sa.text("reviews_done < reviews_needed")
_HELD_REVIEW = sa.text("lease_owner IS NOT NULL")  # a moderator holds (or skipped) the item
_REVIEWED = sa.text("reviews_done >= reviews_needed")  # every review it needs: retention's to delete
_CLAIM = ["pipeline_version_id", "priority", "created_at"]
_ROLLUP_KEYS = {
    "check_rollups": ["minute", "pipeline_version_id", "status", "verdict", "priority", "slot"],
    "check_totals": ["pipeline_version_id", "status", "verdict", "priority", "slot"],
}
_KEY_COLUMNS = ["external_id", "pipeline_version_id", "day"]


def _tenant_column(nullable: bool = False) -> sa.Column:
    if nullable:
        return sa.Column("tenant_id", sa.String(64), nullable=True)
    return sa.Column("tenant_id", sa.String(64), nullable=False, server_default=_DEFAULT)


def upgrade() -> None:
    _create_tables()
    for table in ("checks", "deliveries", "decisions"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(_tenant_column())
    for table in ("dead_letters", "api_keys"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(_tenant_column(nullable=True))
    op.execute(sa.text("UPDATE api_keys SET tenant_id = 'default'"))
    op.create_index("ix_checks_tenant_id_created_at_id", "checks", ["tenant_id", "created_at", "id"])
    op.create_index("ix_decisions_tenant_id_decided_at", "decisions", ["tenant_id", "decided_at"])
    _claim_indexes(["tenant_id", *_CLAIM])
    _rekey("check_keys", ["external_id", "tenant_id", "pipeline_version_id", "day"], add_tenant=True)
    for table, key in _ROLLUP_KEYS.items():
        _rekey(table, [*key[:1], "tenant_id", *key[1:]] if table == "check_rollups" else ["tenant_id", *key],
               add_tenant=True)  # fmt: skip


def downgrade() -> None:
    for table, key in _ROLLUP_KEYS.items():
        _merge_tenants(table, key)
        _rekey(table, key, drop_tenant=True)
    # Without tenants an external id names one check under a version: of several tenants' keys for one id, the
    # default tenant's stays, else the first tenant's by id (the others' checks stay, found by no key).
    op.execute(
        sa.text(
            "DELETE FROM check_keys WHERE tenant_id <> 'default' AND EXISTS (SELECT 1 FROM check_keys AS other "
            "WHERE other.external_id = check_keys.external_id AND other.pipeline_version_id = "
            "check_keys.pipeline_version_id AND (other.tenant_id = 'default' OR other.tenant_id < "
            "check_keys.tenant_id))"
        )
    )
    _rekey("check_keys", _KEY_COLUMNS, drop_tenant=True)
    _claim_indexes(_CLAIM)
    op.drop_index("ix_decisions_tenant_id_decided_at", table_name="decisions")
    op.drop_index("ix_checks_tenant_id_created_at_id", table_name="checks")
    for table in ("checks", "deliveries", "decisions", "dead_letters", "api_keys"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("tenant_id")
    for table in ("review_items", "callback_secrets", "tenant_buckets", "tenants"):
        op.drop_table(table)


def _create_tables() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("weight", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("rate_per_s", sa.Float(), nullable=True),
        sa.Column("burst", sa.Integer(), nullable=True),
        sa.Column("backlog_cap", sa.Integer(), nullable=True),
        sa.Column("pipeline_version_id", sa.String(64), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("disabled_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
    )
    now = "CURRENT_TIMESTAMP"
    op.execute(sa.text(f"INSERT INTO tenants (id, name, weight, created_at) VALUES ('default', 'default', 1, {now})"))
    op.create_table(
        "tenant_buckets",
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("refilled_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_tenant_buckets"),
    )
    op.create_table(
        "callback_secrets",
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("secret", sa.String(128), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("retires_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("key_id", name="pk_callback_secrets"),
    )
    op.create_index("ix_callback_secrets_tenant_id", "callback_secrets", ["tenant_id"])
    op.create_table(
        "review_items",
        sa.Column("check_id", sa.String(36), nullable=False),
        sa.Column("check_created_at", _TIME, nullable=False),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("band", sa.SmallInteger(), nullable=False),
        sa.Column("p_fake_desc", sa.Float(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("reviews_needed", sa.SmallInteger(), nullable=False),
        sa.Column("reviews_done", sa.SmallInteger(), nullable=False),
        sa.Column("reviewed_by", sa.String(32), nullable=True),
        sa.Column("lease_owner", sa.String(32), nullable=True),
        sa.Column("lease_token", sa.String(36), nullable=True),
        sa.Column("lease_expires_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("check_id", name="pk_review_items"),
    )
    op.create_index(
        "ix_review_items_queue", "review_items", ["tenant_id", "band", "p_fake_desc", "created_at"],
        postgresql_where=_OPEN_REVIEW, sqlite_where=_OPEN_REVIEW,
    )  # fmt: skip
    op.create_index("ix_review_items_created_at", "review_items", ["created_at"])
    op.create_index(
        "ix_review_items_reviewed", "review_items", ["created_at"], postgresql_where=_REVIEWED, sqlite_where=_REVIEWED
    )
    op.create_index(
        "ix_review_items_lease_owner", "review_items", ["lease_owner"],
        postgresql_where=_HELD_REVIEW, sqlite_where=_HELD_REVIEW,
    )  # fmt: skip


def _claim_indexes(columns: list[str]) -> None:
    claim_indexes = (("ix_checks_claim_queued", _QUEUED, ["available_at"]), ("ix_checks_claim_running", _RUNNING, []))
    for name, where, extra in claim_indexes:
        op.drop_index(name, table_name="checks")
        op.create_index(name, "checks", [*columns, *extra], postgresql_where=where, sqlite_where=where)


def _rekey(table: str, key: list[str], *, add_tenant: bool = False, drop_tenant: bool = False) -> None:
    """Gives `table` the primary key `key`, adding (every row `default`'s) or dropping its `tenant_id`."""
    with op.batch_alter_table(table, recreate="auto") as batch:
        if add_tenant:
            batch.add_column(_tenant_column())
        batch.drop_constraint(f"pk_{table}", type_="primary")
        if drop_tenant:
            batch.drop_column("tenant_id")
        batch.create_primary_key(f"pk_{table}", key)


def _merge_tenants(table: str, key: list[str]) -> None:
    """Folds every tenant's counts into `default`'s, so the key without the tenant stays unique."""
    columns = ", ".join(key)
    op.execute(sa.text(f"UPDATE {table} SET n = (SELECT sum(n) FROM {table} AS other WHERE " + " AND ".join(
        f"other.{column} = {table}.{column}" for column in key) + ") WHERE tenant_id = 'default'"))  # fmt: skip
    op.execute(sa.text(
        f"INSERT INTO {table} ({columns}, tenant_id, n) SELECT {columns}, 'default', sum(n) FROM {table} "
        f"GROUP BY {columns} HAVING sum(CASE WHEN tenant_id = 'default' THEN 1 ELSE 0 END) = 0"
    ))  # fmt: skip
    op.execute(sa.text(f"DELETE FROM {table} WHERE tenant_id <> 'default'"))
