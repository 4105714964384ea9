"""The ledger's tables of tenants (migration 0010): the tenants themselves, their token buckets and callback
secrets, and the moderators' review queue. Part of `worker.ledger.models`' metadata (it imports them)."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column, synonym

from worker.ledger.columns import Base, UTCDateTime, utcnow


class TenantRow(Base):
    """A platform sharing the deployment: its checks, keys, decisions and deliveries are its own (every read is
    narrowed to one tenant unless an operator key asks for all), and its share of the GPUs and intake is set here.
    A deployment that configures none has one, `default`, which holds every row made before tenants existed."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)  # a slug: worker.ledger.tenants.TENANT_ID
    name: Mapped[str] = mapped_column(sa.String(128))
    weight: Mapped[int] = mapped_column(sa.Integer, default=1, server_default="1")  # share of every claim
    rate_per_s: Mapped[float | None] = mapped_column(sa.Float)  # checks filed per second; NULL: no limit
    burst: Mapped[int | None] = mapped_column(sa.Integer)  # the bucket's size; NULL: one second of the rate
    backlog_cap: Mapped[int | None] = mapped_column(sa.Integer)  # checks queued at once; NULL: no limit
    # The version this tenant's new checks are filed under; NULL follows the deployment's active version.
    pipeline_version_id: Mapped[str | None] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    disabled_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # refuses new checks; reads go on


class TenantBucketRow(Base):
    """A tenant's token bucket (its rate): apart from `tenants` so the hot update touches a row nothing reads
    for anything else."""

    __tablename__ = "tenant_buckets"

    tenant_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    tokens: Mapped[float] = mapped_column(sa.Float)
    refilled_at: Mapped[datetime] = mapped_column(UTCDateTime)


class CallbackSecretRow(Base):
    """A secret that signs a tenant's callbacks, named by its key id in the signature header. A rotation adds a
    new one and gives the old one a `retires_at`: both sign until then, so receivers can switch at leisure."""

    __tablename__ = "callback_secrets"
    __table_args__ = (sa.Index(None, "tenant_id"),)

    key_id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)  # "cs" + 12 hex, public
    tenant_id: Mapped[str] = mapped_column(sa.String(64))
    secret: Mapped[str] = mapped_column(sa.String(128))  # the service must sign with it: kept, not hashed
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    retires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)  # NULL: current


_OPEN_REVIEW = sa.text("reviews_done < reviews_needed")
_HELD_REVIEW = sa.text("lease_owner IS NOT NULL")
_REVIEWED = sa.text("reviews_done >= reviews_needed")


class ReviewItemRow(Base):
    """A done check a moderator should look at, in the review queue of its tenant until it has the reviews it
    needs (two for a sample, to measure agreement). A moderator takes it under a lease, like a worker takes a
    check, so two moderators never review it at once; an abandoned lease expires and the item returns.

    Queue order (the partial index): the uncertain band first, then the highest p(fake), then the oldest.
    """

    __tablename__ = "review_items"
    __table_args__ = (
        sa.Index(
            "ix_review_items_queue",
            "tenant_id",
            "band",
            "p_fake_desc",
            "created_at",
            postgresql_where=_OPEN_REVIEW,
            sqlite_where=_OPEN_REVIEW,
        ),  # fmt: skip
        sa.Index(None, "created_at"),  # retention
        # Items with every review they need, which retention deletes: apart, so finding them reads no open item.
        sa.Index("ix_review_items_reviewed", "created_at", postgresql_where=_REVIEWED, sqlite_where=_REVIEWED),
        sa.Index(None, "lease_owner", postgresql_where=_HELD_REVIEW, sqlite_where=_HELD_REVIEW),  # the few held
    )

    check_id: Mapped[str] = mapped_column(sa.String(36), primary_key=True)
    id = synonym("check_id")  # so `queries.claim_rows` takes review items as it takes checks
    check_created_at: Mapped[datetime] = mapped_column(UTCDateTime)  # finds the check's partition
    tenant_id: Mapped[str] = mapped_column(sa.String(64))
    band: Mapped[int] = mapped_column(sa.SmallInteger)  # 0 uncertain, 1 fake, 2 anything else asked for
    p_fake_desc: Mapped[float] = mapped_column(sa.Float)  # -p_fake: the index is read ascending
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)  # when it entered the queue
    reviews_needed: Mapped[int] = mapped_column(sa.SmallInteger, default=1)
    reviews_done: Mapped[int] = mapped_column(sa.SmallInteger, default=0)
    reviewed_by: Mapped[str | None] = mapped_column(sa.String(32))  # key id of the first review: not the second
    lease_owner: Mapped[str | None] = mapped_column(sa.String(32))  # the moderator's key id
    lease_token: Mapped[str | None] = mapped_column(sa.String(36))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
