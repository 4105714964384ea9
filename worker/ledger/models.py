"""The ledger's tables as SQLAlchemy 2 typed models. The migrations in `migrations/versions` must match them.

Types are chosen so one schema means the same thing on PostgreSQL and SQLite: timestamps go through
`UTCDateTime` (SQLite keeps no time zone), statuses are stored as plain strings (no native enum to migrate),
and constraints carry names from one naming convention, so later migrations can refer to them on both.
"""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime
from enum import StrEnum

import sqlalchemy as sa
from sqlalchemy.orm import Mapped, mapped_column

from worker.ledger.columns import NAMING_CONVENTION, Base, UTCDateTime, utcnow  # noqa: F401 (part of this module's API)
from worker.ledger.states import CheckStatus, DeliveryStatus, Priority


def new_id() -> str:
    return str(uuid.uuid4())


def new_check_id(at: datetime) -> str:
    """A UUIDv7 (RFC 9562) whose first 48 bits are `at` in Unix milliseconds: check ids sort by creation, so a
    new check's index entries land at the right edge of the btree, and the id alone says which day's
    partition holds the check (see `created_at_of`)."""
    millis = int(at.timestamp() * 1000)
    random = int.from_bytes(uuid.uuid4().bytes[6:], "big") & ((1 << 74) - 1)  # 74 random bits
    value = (millis << 80) | (0x7 << 76) | ((random >> 62) << 64) | (0b10 << 62) | (random & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def created_at_of(check_id: str) -> datetime | None:
    """The millisecond a UUIDv7 check id was made at (its check's `created_at`, see `queued_check`), or None
    for an id of another kind (checks filed before ids were UUIDv7 have random ids)."""
    try:
        value = uuid.UUID(check_id)
    except ValueError:
        return None
    if value.version != 7:
        return None
    return datetime.fromtimestamp((value.int >> 80) / 1000, UTC)


def _string_enum(enum: type[StrEnum]) -> sa.Enum:
    # Stored as VARCHAR (no native enum type, no CHECK constraint): adding a status later is a code change only.
    return sa.Enum(
        enum, native_enum=False, create_constraint=False, length=16, values_callable=lambda e: [m.value for m in e]
    )


_STATUS = _string_enum(CheckStatus)
_DELIVERY_STATUS = _string_enum(DeliveryStatus)
_NULLABLE_JSON = sa.JSON(none_as_null=True)  # Python None → SQL NULL, not the JSON literal 'null'
# The WHERE of the claim indexes; a claim's query writes the status into its SQL the same way (see `Ledger.claim`).
_QUEUED = sa.text("status = 'queued'")
_RUNNING = sa.text("status = 'running'")
_DONE = sa.text("status = 'done'")
_DONE_BY_IMAGE = ("image_sha256", "pipeline_version_id", "finished_at", "id")  # the first done check of some bytes
_PENDING = sa.text("status = 'pending'")


DEFAULT_TENANT = "default"  # the tenant of a deployment that configures none, and of every row made before tenants
_TENANT = {"server_default": DEFAULT_TENANT}


def _claim_index(name: str, where: sa.TextClause, *claimable_from: str) -> sa.Index:
    # Tenant first: a fair claim reads each tenant's oldest checks from its own range (see `claims.claim`).
    columns = ("tenant_id", "pipeline_version_id", "priority", "created_at", *claimable_from)
    return sa.Index(name, *columns, postgresql_where=where, sqlite_where=where)


class PipelineVersionRow(Base):
    """The models and head a check was scored with; checks refer to it so results stay attributable."""

    __tablename__ = "pipeline_versions"

    id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)  # PipelineVersion.id, "pv-<16 hex>"
    profile: Mapped[str] = mapped_column(sa.String(64))
    caption: Mapped[str] = mapped_column(sa.Text)
    ground: Mapped[str] = mapped_column(sa.Text)
    embed: Mapped[str] = mapped_column(sa.Text)
    head: Mapped[str] = mapped_column(sa.Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    # The most recently activated version is the one new checks (and re-scores) are made for.
    activated_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ImageRow(Base):
    """What was decoded from a set of bytes; artifacts and checks refer to images by the bytes' sha256."""

    __tablename__ = "images"

    sha256: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    n_bytes: Mapped[int] = mapped_column(sa.Integer)
    width: Mapped[int] = mapped_column(sa.Integer)
    height: Mapped[int] = mapped_column(sa.Integer)
    format: Mapped[str] = mapped_column(sa.String(16))
    media: Mapped[dict | None] = mapped_column(_NULLABLE_JSON)  # a video's or animation's sampled frames (their keys)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    pdq: Mapped[bytes | None] = mapped_column(sa.LargeBinary)  # its PDQ hash (pipeline.core.pdq), 32 bytes
    pdq_quality: Mapped[int | None] = mapped_column(sa.SmallInteger)


class BlobRow(Base):
    """Original bytes of inline (base64) submissions, so a check whose message Redis loses can be re-run."""

    __tablename__ = "blobs"

    sha256: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)  # the day's partition it lives in


class ArtifactRow(Base):
    """One stage's output for one image under one version key; see `pipeline.core.codec` for the encoding.

    Version keys can be long, so the key is `version_hash` (a sha256 prefix) and the full key is kept in
    `version`, which reads check against.
    """

    __tablename__ = "artifacts"

    sha256: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    version_hash: Mapped[str] = mapped_column(sa.String(32), primary_key=True)
    version: Mapped[str] = mapped_column(sa.Text)
    payload: Mapped[dict] = mapped_column(sa.JSON)
    vectors: Mapped[bytes | None] = mapped_column(sa.LargeBinary)  # float32 little-endian rows
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CheckRow(Base):
    """One moderation request: a platform's id for an image under one pipeline version, and its outcome."""

    __tablename__ = "checks"
    # On PostgreSQL the table is partitioned by day of `created_at` (see `worker.ledger.partitions`): its primary
    # key there is (id, created_at), as a unique key of a partitioned table must hold the partition key, and no
    # unique key can span days. Idempotency by external id therefore lives in `check_keys`. `updated_at` is in
    # no index, so renewing a lease (the most frequent write) is a HOT update that touches no index.
    __table_args__ = (
        sa.Index(None, "external_id", "pipeline_version_id"),  # find a check by the platform's id
        sa.Index(None, "tenant_id", "created_at", "id"),  # one tenant's checks, newest first (its keys' reads)
        # Answering duplicate bytes: the first done check of an image under a version is the first entry of its
        # range (see `images.done_checks_for_images`), one row read however often the bytes were sent.
        sa.Index("ix_checks_done_by_image", *_DONE_BY_IMAGE, postgresql_where=_DONE, sqlite_where=_DONE),
        sa.Index(None, "finished_at"),
        sa.Index(None, "rescore_of"),
        sa.Index(None, "created_at", "id"),  # lists newest first, a page at a time (the API, the console)
        # Claiming a batch (see `Ledger.claim`): the queued checks, and the running ones (a lease that expired is
        # taken over), each of a version in claim order, then the time from which a row is claimable, so a claim
        # reads its first entries without sorting and skips a retry not due or a live lease inside the index.
        # Partial: they hold the backlog and the checks in flight, not every check ever finished. Named for their
        # use, as the convention's names for these columns pass PostgreSQL's 63 characters.
        # The running one leaves `lease_expires_at` out: it holds only the checks in flight (a few batches per
        # GPU), and a renewal that changed an indexed column could not be a HOT update.
        _claim_index("ix_checks_claim_queued", _QUEUED, "available_at"),
        _claim_index("ix_checks_claim_running", _RUNNING),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    tenant_id: Mapped[str] = mapped_column(sa.String(64), default=DEFAULT_TENANT, **_TENANT)  # the platform's
    external_id: Mapped[str] = mapped_column(sa.String(512))
    pipeline_version_id: Mapped[str] = mapped_column(sa.String(64), sa.ForeignKey("pipeline_versions.id"))
    source: Mapped[dict] = mapped_column(sa.JSON)  # {"url": ...} | {"path": ...} | {"blob": sha256}
    image_sha256: Mapped[str | None] = mapped_column(sa.String(64))
    status: Mapped[CheckStatus] = mapped_column(_STATUS, default=CheckStatus.queued)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(sa.String(128))
    error_message: Mapped[str | None] = mapped_column(sa.Text)
    p_fake: Mapped[float | None] = mapped_column(sa.Float)
    verdict: Mapped[str | None] = mapped_column(sa.String(16))  # real, uncertain or fake
    verdict_reason: Mapped[str | None] = mapped_column(sa.String(32))  # score, or provenance.c2pa|xmp that forced it
    threshold: Mapped[float | None] = mapped_column(sa.Float)
    threshold_low: Mapped[float | None] = mapped_column(sa.Float)  # the uncertain band's lower edge, if any
    object_count: Mapped[int | None] = mapped_column(sa.Integer)
    caption: Mapped[str | None] = mapped_column(sa.Text)
    objects: Mapped[list | None] = mapped_column(_NULLABLE_JSON)  # [{phrase, box, score, misalignment}]
    timings_ms: Mapped[dict | None] = mapped_column(_NULLABLE_JSON)
    attribution: Mapped[list | None] = mapped_column(_NULLABLE_JSON)  # [{generator, p}] from an attribution head
    provenance: Mapped[dict | None] = mapped_column(_NULLABLE_JSON)  # `Provenance.to_dict()` of the image's bytes
    media: Mapped[dict | None] = mapped_column(_NULLABLE_JSON)  # a video's or animation's frames and their scores
    reused_from: Mapped[dict | None] = mapped_column(_NULLABLE_JSON)  # {check_id, distance}: a near-copy's answer
    match: Mapped[dict | None] = mapped_column(_NULLABLE_JSON)  # {label, decision_id, check_id, distance}: the bank
    priority: Mapped[int] = mapped_column(sa.SmallInteger, default=Priority.fresh, server_default="0")
    rescore_of: Mapped[str | None] = mapped_column(sa.String(36))  # the earlier check this one re-scores
    callback_url: Mapped[str | None] = mapped_column(sa.Text)  # where the result is POSTed, signed
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    available_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)  # a retry is not claimed before
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    # The lease of the worker running it: only the holder of the token may change it, and only until it expires
    # may no other worker take it over.
    lease_owner: Mapped[str | None] = mapped_column(sa.String(128))  # host:pid
    lease_token: Mapped[str | None] = mapped_column(sa.String(36))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class CheckKeyRow(Base):
    """What makes filing idempotent: the check a platform's external id names under one version.

    A table of its own because `checks` is partitioned by day on PostgreSQL, where no unique key can span days.
    A key is unique per day (`day` is the partition key); the filer looks for the key in every day of the
    idempotency window before it adds one (see `worker.ledger.checks.create_checks`), and keys older than the
    window are dropped a day at a time (ITEM_RETAIN_KEYS_DAYS).
    """

    __tablename__ = "check_keys"

    external_id: Mapped[str] = mapped_column(sa.String(512), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)  # idempotency is per tenant
    pipeline_version_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    day: Mapped[date] = mapped_column(sa.Date, primary_key=True)  # UTC day the key was filed
    check_id: Mapped[str] = mapped_column(sa.String(36))


class DeliveryRow(Base):
    """One result to push to one target (a callback URL or the results stream): an outbox row.

    Written in the same transaction as the check's outcome, so a result is never stored without its delivery;
    a worker's deliverer thread sends it later, retrying with backoff, and records a delivery that keeps failing.
    """

    __tablename__ = "deliveries"
    __table_args__ = (
        # One delivery per check and target, however often it ends. With the check's creation time, which a
        # check id determines, the key holds the partition key (PostgreSQL partitions deliveries by the day their
        # check was made) and stays unique per check.
        sa.UniqueConstraint("check_id", "target", "check_created_at"),
        # The deliverer's scan for due deliveries. Partial: a delivered or failed row leaves the index.
        sa.Index("ix_deliveries_due", "next_attempt_at", postgresql_where=_PENDING, sqlite_where=_PENDING),
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    # No foreign key: `checks` is partitioned by day on PostgreSQL (no unique `id` to refer to), and deliveries
    # are dropped by day before their checks are (see `worker.ledger.retention`).
    check_id: Mapped[str] = mapped_column(sa.String(36))
    check_created_at: Mapped[datetime] = mapped_column(UTCDateTime)  # the check's `created_at`: see the key
    tenant_id: Mapped[str] = mapped_column(sa.String(64), default=DEFAULT_TENANT, **_TENANT)  # signs with its secret
    target: Mapped[str] = mapped_column(sa.Text)  # "stream" or the callback URL
    status: Mapped[DeliveryStatus] = mapped_column(_DELIVERY_STATUS, default=DeliveryStatus.pending)
    attempts: Mapped[int] = mapped_column(sa.Integer, default=0)
    body: Mapped[dict] = mapped_column(sa.JSON)  # the result as sent: the same bytes on every retry
    last_error: Mapped[str | None] = mapped_column(sa.Text)
    next_attempt_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)


class DeadLetterRow(Base):
    """A message the intake could not file as a check (no usable external id, not JSON, another task): kept,
    with why, for an operator to read (`item deadletters`), and acknowledged so it is not delivered forever."""

    __tablename__ = "dead_letters"
    __table_args__ = (sa.Index(None, "received_at"),)

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    received_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    code: Mapped[str] = mapped_column(sa.String(128))
    reason: Mapped[str] = mapped_column(sa.Text)
    queue: Mapped[str | None] = mapped_column(sa.String(255))
    task: Mapped[str | None] = mapped_column(sa.String(255))
    content_type: Mapped[str | None] = mapped_column(sa.String(255))
    body: Mapped[str | None] = mapped_column(sa.Text)  # the raw body, cut at DEAD_LETTER_BODY_CHARS
    tenant_id: Mapped[str | None] = mapped_column(sa.String(64))  # the tenant whose queue it came in on, if known


class ApiKeyRow(Base):
    """A key of the HTTP API and console: its public id, what it may do, and a hash of its secret (never the
    secret itself: `item keys create` prints that once)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(sa.String(32), primary_key=True)  # the key's public prefix, "k" + 12 hex
    name: Mapped[str] = mapped_column(sa.String(128))
    scopes: Mapped[list] = mapped_column(sa.JSON)  # of worker.web.keys.SCOPES
    # The tenant whose checks the key files and reads; NULL only for an operator key made with --all-tenants.
    tenant_id: Mapped[str | None] = mapped_column(sa.String(64))
    secret_sha256: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class ConsoleSessionRow(Base):
    """A console sign-in: the cookie holds a random token, the ledger its hash, the key it was made with and
    the form token (CSRF) of its forms. Revoking the key ends its sessions."""

    __tablename__ = "console_sessions"
    __table_args__ = (sa.Index(None, "expires_at"),)

    token_sha256: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    key_id: Mapped[str] = mapped_column(sa.String(32), sa.ForeignKey("api_keys.id", ondelete="CASCADE"))
    csrf_token: Mapped[str] = mapped_column(sa.String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class DecisionRow(Base):
    """A moderator's decision on a check: every decision is kept (who, when); the latest one counts."""

    __tablename__ = "decisions"
    __table_args__ = (
        sa.Index(None, "check_id", "decided_at"),
        sa.Index(None, "decided_at"),
        sa.Index(None, "tenant_id", "decided_at"),  # a tenant's moderators' counts on the operations page
    )

    id: Mapped[str] = mapped_column(sa.String(36), primary_key=True, default=new_id)
    check_id: Mapped[str] = mapped_column(sa.String(36))  # no foreign key: see DeliveryRow.check_id
    tenant_id: Mapped[str] = mapped_column(sa.String(64), default=DEFAULT_TENANT, **_TENANT)  # the check's
    label: Mapped[str] = mapped_column(sa.String(16))  # ai_generated | authentic | unsure
    reviewer: Mapped[str] = mapped_column(sa.String(128))  # the name of the key that decided
    key_id: Mapped[str | None] = mapped_column(sa.String(32))
    note: Mapped[str | None] = mapped_column(sa.Text)
    decided_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ThumbnailRow(Base):
    """A small JPEG of a checked image, made by the worker that decoded it, so the console shows URL and S3
    uploads without ever fetching an arbitrary URL itself. Kept for ITEM_THUMBNAIL_RETENTION_DAYS from the
    last day it was made (`created_at` is that day's start: see `reviews.put_thumbnails`)."""

    __tablename__ = "thumbnails"
    __table_args__ = (sa.Index(None, "created_at"),)

    sha256: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    data: Mapped[bytes] = mapped_column(sa.LargeBinary)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)  # the day's partition it lives in
    width: Mapped[int] = mapped_column(sa.Integer)
    height: Mapped[int] = mapped_column(sa.Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class WorkerRow(Base):
    """A GPU loop's heartbeat: which version it serves and when it was last seen (the console's workers alive)."""

    __tablename__ = "workers"

    owner: Mapped[str] = mapped_column(sa.String(128), primary_key=True)  # host:pid, as in leases
    pipeline_version_id: Mapped[str] = mapped_column(sa.String(64))
    started_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    seen_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class CheckRollupRow(Base):
    """Checks that ended in one UTC minute, per tenant, version, status, verdict and priority: what the operator views
    read instead of `checks` (see `worker.ledger.rollups`). A key's count is spread over `slot` rows, so
    transactions ending checks at once seldom wait on one row's lock; readers sum them."""

    __tablename__ = "check_rollups"

    minute: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)  # finished_at, truncated
    tenant_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True, **_TENANT)
    pipeline_version_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(16), primary_key=True)  # done, rejected or failed
    verdict: Mapped[str] = mapped_column(sa.String(16), primary_key=True)  # '' when none
    priority: Mapped[int] = mapped_column(sa.SmallInteger, primary_key=True)
    slot: Mapped[int] = mapped_column(sa.SmallInteger, primary_key=True)
    n: Mapped[int] = mapped_column(sa.BigInteger)


class CheckTotalRow(Base):
    """`CheckRollupRow` without the minute: checks ever ended, kept when the minutes are pruned."""

    __tablename__ = "check_totals"

    tenant_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True, **_TENANT)
    pipeline_version_id: Mapped[str] = mapped_column(sa.String(64), primary_key=True)
    status: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    verdict: Mapped[str] = mapped_column(sa.String(16), primary_key=True)
    priority: Mapped[int] = mapped_column(sa.SmallInteger, primary_key=True)
    slot: Mapped[int] = mapped_column(sa.SmallInteger, primary_key=True)
    n: Mapped[int] = mapped_column(sa.BigInteger)


class CheckLatencyRow(Base):
    """Done checks of one UTC minute per log-spaced bucket of their filing-to-result latency: the operations
    page's percentiles (see `worker.ledger.rollups.latency_bucket`)."""

    __tablename__ = "check_latency_rollups"

    minute: Mapped[datetime] = mapped_column(UTCDateTime, primary_key=True)
    bucket: Mapped[int] = mapped_column(sa.SmallInteger, primary_key=True)
    slot: Mapped[int] = mapped_column(sa.SmallInteger, primary_key=True)
    n: Mapped[int] = mapped_column(sa.BigInteger)


# The tables of tenants, their quotas and secrets, and the review queue: in `worker.ledger.tenant_rows`, imported
# here so that `Base.metadata` (the migrations' check, `create_all`) holds them wherever models are imported.
from worker.ledger.near_rows import BankEntryRow, NearHashRow  # noqa: E402, F401
from worker.ledger.tenant_rows import CallbackSecretRow, ReviewItemRow, TenantBucketRow, TenantRow  # noqa: E402, F401
