"""Claims read indexes in claim order: queued and running checks by version, priority and age, each partial.

A claim takes queued checks that are due and running ones whose lease expired. With the indexes it replaces,
(pipeline_version_id, status, priority, created_at) and (status, lease_expires_at), PostgreSQL read every
claimable check of both statuses and sorted them: a second and more per claim behind a million queued re-scores.
A claim now picks each status from its own partial index in claim order, skipping rows not yet claimable inside
the index, and the reconciler's scan for abandoned checks reads the running one.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CLAIM_ORDER = ["pipeline_version_id", "priority", "created_at"]
_CLAIM_INDEXES = {  # name: (the time from which a row is claimable, the status it holds)
    "ix_checks_claim_queued": ("available_at", "queued"),
    "ix_checks_claim_running": ("lease_expires_at", "running"),
}


def upgrade() -> None:
    for name, (claimable_from, status) in _CLAIM_INDEXES.items():
        where = sa.text(f"status = '{status}'")
        op.create_index(name, "checks", [*_CLAIM_ORDER, claimable_from], postgresql_where=where, sqlite_where=where)
    op.drop_index("ix_checks_pipeline_version_id_status_priority_created_at", table_name="checks")
    op.drop_index("ix_checks_status_lease_expires_at", table_name="checks")


def downgrade() -> None:
    op.create_index("ix_checks_status_lease_expires_at", "checks", ["status", "lease_expires_at"])
    op.create_index(
        "ix_checks_pipeline_version_id_status_priority_created_at",
        "checks",
        ["pipeline_version_id", "status", "priority", "created_at"],
    )
    for name in reversed(_CLAIM_INDEXES):
        op.drop_index(name, table_name="checks")
