"""Better decisions: a check keeps what its image declared (provenance), why its verdict is what it is, and an
attribution head's likeliest generators.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("checks") as batch:
        batch.add_column(sa.Column("verdict_reason", sa.String(32), nullable=True))
        batch.add_column(sa.Column("attribution", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("provenance", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checks") as batch:
        batch.drop_column("provenance")
        batch.drop_column("attribution")
        batch.drop_column("verdict_reason")
