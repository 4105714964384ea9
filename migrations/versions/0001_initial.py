"""The initial ledger: pipeline versions, images, blobs, artifacts and checks.

Revision ID: 0001
Revises:
Create Date: 2025-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from the models: a migration must keep meaning what it meant when written.
_TIME = sa.DateTime(timezone=True)
_STATUS = sa.String(16)  # CheckStatus values, stored as plain strings (no native enum, no CHECK constraint)


def upgrade() -> None:
    op.create_table(
        "pipeline_versions",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("profile", sa.String(64), nullable=False),
        sa.Column("caption", sa.Text(), nullable=False),
        sa.Column("ground", sa.Text(), nullable=False),
        sa.Column("embed", sa.Text(), nullable=False),
        sa.Column("head", sa.Text(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_pipeline_versions"),
    )
    op.create_table(
        "images",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("n_bytes", sa.Integer(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("format", sa.String(16), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_images"),
    )
    op.create_table(
        "blobs",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_blobs"),
    )
    op.create_table(
        "artifacts",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("version_hash", sa.String(32), nullable=False),
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("vectors", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("sha256", "kind", "version_hash", name="pk_artifacts"),
    )
    _create_checks()


def _create_checks() -> None:
    op.create_table(
        "checks",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("external_id", sa.String(512), nullable=False),
        sa.Column("pipeline_version_id", sa.String(64), nullable=False),
        sa.Column("source", sa.JSON(), nullable=False),
        sa.Column("image_sha256", sa.String(64), nullable=True),
        sa.Column("status", _STATUS, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("error_code", sa.String(128), nullable=True),
        sa.Column("error_message", sa.Text(), nullable=True),
        sa.Column("p_fake", sa.Float(), nullable=True),
        sa.Column("verdict", sa.String(16), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=True),
        sa.Column("object_count", sa.Integer(), nullable=True),
        sa.Column("caption", sa.Text(), nullable=True),
        sa.Column("objects", sa.JSON(), nullable=True),
        sa.Column("timings_ms", sa.JSON(), nullable=True),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("enqueued_at", _TIME, nullable=True),
        sa.Column("started_at", _TIME, nullable=True),
        sa.Column("finished_at", _TIME, nullable=True),
        sa.Column("updated_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_checks"),
        sa.ForeignKeyConstraint(
            ["pipeline_version_id"], ["pipeline_versions.id"], name="fk_checks_pipeline_version_id_pipeline_versions"
        ),
        sa.UniqueConstraint("external_id", "pipeline_version_id", name="uq_checks_external_id_pipeline_version_id"),
    )
    op.create_index("ix_checks_status_updated_at", "checks", ["status", "updated_at"])
    op.create_index("ix_checks_image_sha256", "checks", ["image_sha256"])
    op.create_index("ix_checks_finished_at", "checks", ["finished_at"])


def downgrade() -> None:
    op.drop_index("ix_checks_finished_at", table_name="checks")
    op.drop_index("ix_checks_image_sha256", table_name="checks")
    op.drop_index("ix_checks_status_updated_at", table_name="checks")
    op.drop_table("checks")
    op.drop_table("artifacts")
    op.drop_table("blobs")
    op.drop_table("images")
    op.drop_table("pipeline_versions")
