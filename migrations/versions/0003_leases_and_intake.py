"""Ledger-driven workers: leases on claimed checks, a retry's earliest time, dead letters of the intake.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("checks") as batch:
        batch.add_column(sa.Column("available_at", _TIME, nullable=True))
        batch.add_column(sa.Column("lease_owner", sa.String(128), nullable=True))
        batch.add_column(sa.Column("lease_token", sa.String(36), nullable=True))
        batch.add_column(sa.Column("lease_expires_at", _TIME, nullable=True))
    # Every check already queued may be claimed at once; a running one is taken over like an expired lease.
    op.execute("UPDATE checks SET available_at = COALESCE(enqueued_at, created_at)")
    op.execute("UPDATE checks SET lease_expires_at = updated_at WHERE status = 'running'")
    with op.batch_alter_table("checks") as batch:
        batch.alter_column("available_at", existing_type=_TIME, nullable=False)
    op.create_index("ix_checks_status_lease_expires_at", "checks", ["status", "lease_expires_at"])
    op.create_table(
        "dead_letters",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("received_at", _TIME, nullable=False),
        sa.Column("code", sa.String(128), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("queue", sa.String(255), nullable=True),
        sa.Column("task", sa.String(255), nullable=True),
        sa.Column("content_type", sa.String(255), nullable=True),
        sa.Column("body", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_dead_letters"),
    )
    op.create_index("ix_dead_letters_received_at", "dead_letters", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_received_at", table_name="dead_letters")
    op.drop_table("dead_letters")
    op.drop_index("ix_checks_status_lease_expires_at", table_name="checks")
    with op.batch_alter_table("checks") as batch:
        batch.drop_column("lease_expires_at")
        batch.drop_column("lease_token")
        batch.drop_column("lease_owner")
        batch.drop_column("available_at")
