"""Re-scoring and result delivery: active pipeline versions, check priority and lineage, callbacks, deliveries.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    # Batch mode: SQLite can add columns in place but not drop them; on PostgreSQL these are plain ALTERs.
    with op.batch_alter_table("pipeline_versions") as batch:
        batch.add_column(sa.Column("activated_at", _TIME, nullable=True))
    # Until now the newest registered version was the active one: activating each at its creation keeps that.
    op.execute("UPDATE pipeline_versions SET activated_at = created_at")
    with op.batch_alter_table("checks") as batch:
        batch.add_column(sa.Column("priority", sa.SmallInteger(), server_default="0", nullable=False))
        batch.add_column(sa.Column("rescore_of", sa.String(36), nullable=True))
        batch.add_column(sa.Column("callback_url", sa.Text(), nullable=True))
    op.create_index(
        "ix_checks_pipeline_version_id_status_priority_created_at",
        "checks",
        ["pipeline_version_id", "status", "priority", "created_at"],
    )
    op.create_index("ix_checks_rescore_of", "checks", ["rescore_of"])
    op.create_table(
        "deliveries",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("check_id", sa.String(36), nullable=False),
        sa.Column("target", sa.Text(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("next_attempt_at", _TIME, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("delivered_at", _TIME, nullable=True),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_deliveries"),
        sa.ForeignKeyConstraint(["check_id"], ["checks.id"], name="fk_deliveries_check_id_checks"),
        sa.UniqueConstraint("check_id", "target", name="uq_deliveries_check_id_target"),
    )
    op.create_index("ix_deliveries_status_next_attempt_at", "deliveries", ["status", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_status_next_attempt_at", table_name="deliveries")
    op.drop_table("deliveries")
    op.drop_index("ix_checks_rescore_of", table_name="checks")
    op.drop_index("ix_checks_pipeline_version_id_status_priority_created_at", table_name="checks")
    with op.batch_alter_table("checks") as batch:
        batch.drop_column("callback_url")
        batch.drop_column("rescore_of")
        batch.drop_column("priority")
    with op.batch_alter_table("pipeline_versions") as batch:
        batch.drop_column("activated_at")
