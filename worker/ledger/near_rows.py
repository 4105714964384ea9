"""The ledger's tables of near duplicates (migration 0011): the PDQ hashes of judged images, and the bank of
moderators' decisions by hash. Part of `worker.ledger.models`' metadata (it imports them).

`chunks` holds a hash's 8 multi-index keys (`pipeline.core.pdq.chunk_keys`): an array with a GIN index on
PostgreSQL, so a lookup is one `chunks && :probes`; JSON on SQLite, which scans (see `worker.ledger.near`).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Mapped, mapped_column

from worker.ledger.columns import Base, UTCDateTime, utcnow

CHUNK_KEYS = postgresql.ARRAY(sa.BigInteger).with_variant(sa.JSON(), "sqlite")
ROW_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # SQLite autoincrements INTEGER PRIMARY KEY only


class NearHashRow(Base):
    """The PDQ hash of a done check's image under its version: a later copy within the tenant's distance is
    answered from that check. Kept for the retention of near hashes (`worker.ledger.near.purge`)."""

    __tablename__ = "near_hashes"
    __table_args__ = (
        sa.Index(None, "chunks", postgresql_using="gin"),
        sa.Index(None, "created_at"),  # retention
    )

    id: Mapped[int] = mapped_column(ROW_ID, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(64))
    pipeline_version_id: Mapped[str] = mapped_column(sa.String(64))  # as checks.pipeline_version_id
    check_id: Mapped[str] = mapped_column(sa.String(36))
    image_sha256: Mapped[str] = mapped_column(sa.String(64))
    pdq: Mapped[bytes] = mapped_column(sa.LargeBinary)  # 32 bytes
    chunks: Mapped[list[int]] = mapped_column(CHUNK_KEYS)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class BankEntryRow(Base):
    """A moderator's decision on a check, by its image's PDQ hash: a copy of the image gets the moderator's label
    whatever the model says, under every version. One per check: a later decision replaces it."""

    __tablename__ = "bank_entries"
    __table_args__ = (
        sa.UniqueConstraint("tenant_id", "check_id"),
        sa.Index(None, "chunks", postgresql_using="gin"),
        sa.Index(None, "created_at"),
    )

    id: Mapped[int] = mapped_column(ROW_ID, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(64))
    label: Mapped[str] = mapped_column(sa.String(16))  # fake | real
    pdq: Mapped[bytes] = mapped_column(sa.LargeBinary)
    chunks: Mapped[list[int]] = mapped_column(CHUNK_KEYS)
    check_id: Mapped[str] = mapped_column(sa.String(36))
    image_sha256: Mapped[str] = mapped_column(sa.String(64))
    decision_id: Mapped[str] = mapped_column(sa.String(36))  # decisions.id
    decided_by: Mapped[str | None] = mapped_column(sa.String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
