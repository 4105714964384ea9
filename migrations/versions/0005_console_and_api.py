"""The HTTP API and console: keys with scopes, console sessions, moderators' decisions, thumbnails, workers.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_index("ix_checks_created_at_id", "checks", ["created_at", "id"])  # pages, newest first
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("scopes", sa.JSON(), nullable=False),
        sa.Column("secret_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("last_used_at", _TIME, nullable=True),
        sa.Column("revoked_at", _TIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
    )
    op.create_table(
        "console_sessions",
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.Column("expires_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(
            ["key_id"], ["api_keys.id"], name="fk_console_sessions_key_id_api_keys", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("token_sha256", name="pk_console_sessions"),
    )
    op.create_index("ix_console_sessions_expires_at", "console_sessions", ["expires_at"])
    op.create_table(
        "decisions",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("check_id", sa.String(36), nullable=False),
        sa.Column("label", sa.String(16), nullable=False),
        sa.Column("reviewer", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=True),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("decided_at", _TIME, nullable=False),
        sa.ForeignKeyConstraint(["check_id"], ["checks.id"], name="fk_decisions_check_id_checks"),
        sa.PrimaryKeyConstraint("id", name="pk_decisions"),
    )
    op.create_index("ix_decisions_check_id_decided_at", "decisions", ["check_id", "decided_at"])
    op.create_index("ix_decisions_decided_at", "decisions", ["decided_at"])
    op.create_table(
        "thumbnails",
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("created_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_thumbnails"),
    )
    op.create_index("ix_thumbnails_created_at", "thumbnails", ["created_at"])
    op.create_table(
        "workers",
        sa.Column("owner", sa.String(128), nullable=False),
        sa.Column("pipeline_version_id", sa.String(64), nullable=False),
        sa.Column("started_at", _TIME, nullable=False),
        sa.Column("seen_at", _TIME, nullable=False),
        sa.PrimaryKeyConstraint("owner", name="pk_workers"),
    )


def downgrade() -> None:
    op.drop_table("workers")
    op.drop_index("ix_thumbnails_created_at", table_name="thumbnails")
    op.drop_table("thumbnails")
    op.drop_index("ix_decisions_decided_at", table_name="decisions")
    op.drop_index("ix_decisions_check_id_decided_at", table_name="decisions")
    op.drop_table("decisions")
    op.drop_index("ix_console_sessions_expires_at", table_name="console_sessions")
    op.drop_table("console_sessions")
    op.drop_table("api_keys")
    op.drop_index("ix_checks_created_at_id", table_name="checks")
