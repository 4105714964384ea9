"""Near duplicates: the PDQ hashes of judged images, a bank of moderators' decisions by hash, and each image's
PDQ hash.

- `near_hashes` (a done check's image hash under its version, kept for their retention) and `bank_entries` (one
  per decided check, per tenant) are new; their `chunks` are the hash's 8 multi-index keys, a `bigint[]` with a
  GIN index on PostgreSQL, JSON on SQLite (see `worker.ledger.near`).
- `images` gets the nullable `pdq` and `pdq_quality`. On PostgreSQL `images` is partitioned: adding a nullable
  column to the parent adds it to every partition, a change of the catalogue only (no rewrite).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)
_CHUNKS = postgresql.ARRAY(sa.BigInteger).with_variant(sa.JSON(), "sqlite")
_ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "near_hashes",
        sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("pipeline_version_id", sa.String(64), nullable=False),
        sa.Column("check_id", sa.String(36), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("pdq", sa.LargeBinary(), nullable=False),
        sa.Column("chunks", _CHUNKS, nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_near_hashes"),
    )
    op.create_index("ix_near_hashes_chunks", "near_hashes", ["chunks"], postgresql_using="gin")
    op.create_index("ix_near_hashes_created_at", "near_hashes", ["created_at"])
    op.create_table(
        "bank_entries",
        sa.Column("id", _ROW_ID, primary_key=True, autoincrement=True),
        sa.Column("tenant_id", sa.String(64), nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("pdq", sa.LargeBinary(), nullable=False),
        sa.Column("chunks", _CHUNKS, nullable=False),
        sa.Column("check_id", sa.String(36), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=False),
        sa.Column("decision_id", sa.String(36), nullable=False),
        sa.Column("decided_by", sa.String(200), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_bank_entries"),
        sa.UniqueConstraint("tenant_id", "check_id", name="uq_bank_entries_tenant_id_check_id"),
    )
    op.create_index("ix_bank_entries_chunks", "bank_entries", ["chunks"], postgresql_using="gin")
    op.create_index("ix_bank_entries_created_at", "bank_entries", ["created_at"])
    with op.batch_alter_table("images") as batch:
        batch.add_column(sa.Column("pdq", sa.LargeBinary(), nullable=True))
        batch.add_column(sa.Column("pdq_quality", sa.SmallInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("images") as batch:
        batch.drop_column("pdq_quality")
        batch.drop_column("pdq")
    op.drop_table("bank_entries")
    op.drop_table("near_hashes")
