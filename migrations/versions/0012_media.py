"""Animated images and videos: what was sampled of an upload (its frames' keys, so a re-score finds their stored
artifacts without decoding it again), and per check the frames' scores and where a near-copy's answer came from.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

CHECK_COLUMNS = ("media", "reused_from", "match")


def upgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("media", sa.JSON(), nullable=True))
    with op.batch_alter_table("checks") as batch:
        for name in CHECK_COLUMNS:
            batch.add_column(sa.Column(name, sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("checks") as batch:
        for name in reversed(CHECK_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("images") as batch:
        batch.drop_column("media")
