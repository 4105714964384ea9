"""Near duplicates in the ledger: copies of judged images found by PDQ hash, and the bank of moderators' decisions.

Functions over a Session, each one statement whatever the number of hashes. A lookup sends the union of every
query's probe keys (`pipeline.core.pdq.probe_keys`) as one array: on PostgreSQL `chunks && :probes` reads the
GIN index and returns the few rows sharing a key with some query, whose exact Hamming distance to each query is
then taken here. On SQLite (the embedded, single-machine ledger) the lookup reads every row of the tenant (and
version) and measures each: linear, fine for the ledgers SQLite holds.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import Grouping

from pipeline.core.pdq import MAX_PROBE_DISTANCE, chunk_keys, hamming, probe_keys
from worker.ledger.models import utcnow
from worker.ledger.near_rows import BankEntryRow, NearHashRow
from worker.ledger.queries import dialect_insert, insert_many

LABELS = ("fake", "real")
PAGE = 1000
PROBE_SLICE = 128  # probes a GIN scan is given at once: see `_probe_query`


@dataclass(frozen=True)
class NearEntry:
    """A done check's image hash to record under its tenant and version."""

    tenant_id: str
    pipeline_version_id: str
    check_id: str
    image_sha256: str
    pdq: bytes
    created_at: datetime = field(default_factory=utcnow)


class NearMatch(NamedTuple):
    check_id: str
    image_sha256: str
    distance: int


class BankMatch(NamedTuple):
    label: str
    check_id: str
    decision_id: str
    distance: int


@dataclass(frozen=True)
class BankEntry:
    id: int
    tenant_id: str
    label: str
    pdq: bytes
    check_id: str
    image_sha256: str
    decision_id: str
    decided_by: str | None
    created_at: datetime


def record(session: Session, rows: list[NearEntry]) -> None:
    """Adds the hashes of `rows`: one INSERT for all of them."""
    insert_many(
        session,
        NearHashRow,
        [
            {
                "tenant_id": row.tenant_id,
                "pipeline_version_id": row.pipeline_version_id,
                "check_id": row.check_id,
                "image_sha256": row.image_sha256,
                "pdq": row.pdq,
                "chunks": chunk_keys(row.pdq),
                "created_at": row.created_at,
            }
            for row in rows
        ],
    )


def find(
    session: Session,
    tenant_id: str,
    pipeline_version_id: str,
    hashes: dict[str, bytes],
    max_distance: int,
    exclude_shas: Collection[str] = (),
) -> dict[str, NearMatch]:
    """For each key of `hashes`, the closest recorded hash of the tenant and version within `max_distance`
    (0..23; ties: the newest), leaving out images whose sha256 is in `exclude_shas` (the same bytes, which the
    caller answers exactly). Keys without one are absent."""
    model = NearHashRow
    where = [model.tenant_id == tenant_id, model.pipeline_version_id == pipeline_version_id]
    columns = (model.check_id, model.image_sha256, model.pdq, model.created_at)
    rows = _candidates(session, model, columns, where, hashes, max_distance)
    rows = [row for row in rows if row.image_sha256 not in exclude_shas]
    return {
        key: NearMatch(row.check_id, row.image_sha256, distance)
        for key, (row, distance) in _closest(rows, hashes, max_distance).items()
    }


def bank_put(
    session: Session,
    tenant_id: str,
    label: str,
    check_id: str,
    image_sha256: str,
    pdq: bytes,
    decision_id: str,
    decided_by: str | None,
) -> None:
    """Banks a moderator's decision on a check (`label` fake or real); a later one on the check replaces it."""
    if label not in LABELS:
        raise ValueError(f"a bank label is one of {LABELS}, not {label!r}")
    values = {"label": label, "image_sha256": image_sha256, "pdq": pdq, "chunks": chunk_keys(pdq)}
    values |= {"decision_id": decision_id, "decided_by": decided_by, "created_at": utcnow()}
    statement = dialect_insert(session, BankEntryRow).values(tenant_id=tenant_id, check_id=check_id, **values)
    session.execute(statement.on_conflict_do_update(index_elements=["tenant_id", "check_id"], set_=values))


def bank_remove(session: Session, tenant_id: str, check_id: str) -> bool:
    """Takes a check's decision out of the bank (it was withdrawn, or became unsure). Whether there was one."""
    model = BankEntryRow
    deleted = session.execute(sa.delete(model).where(model.tenant_id == tenant_id, model.check_id == check_id))
    return bool(deleted.rowcount)


def bank_find(session: Session, tenant_id: str, hashes: dict[str, bytes], max_distance: int) -> dict[str, BankMatch]:
    """For each key of `hashes`, the closest banked decision of the tenant within `max_distance` (then the
    newest). The bank holds for every version: it is what moderators saw, not what a model said."""
    model = BankEntryRow
    columns = (model.label, model.check_id, model.decision_id, model.pdq, model.created_at)
    rows = _candidates(session, model, columns, [model.tenant_id == tenant_id], hashes, max_distance)
    return {
        key: BankMatch(row.label, row.check_id, row.decision_id, distance)
        for key, (row, distance) in _closest(rows, hashes, max_distance).items()
    }


def bank_entries(
    session: Session, tenant_id: str | None = None, after_id: int = 0, since: datetime | None = None, limit: int = PAGE
) -> list[BankEntry]:
    """The bank a page at a time, oldest first by id (an HMA adapter passes the last id it saw as `after_id`):
    of one tenant or every one, banked at or after `since` if given. A replaced entry comes again, under its
    new id."""
    model = BankEntryRow
    query = sa.select(model).where(model.id > after_id).order_by(model.id).limit(limit)
    if tenant_id is not None:
        query = query.where(model.tenant_id == tenant_id)
    if since is not None:
        query = query.where(model.created_at >= since)
    return [
        BankEntry(
            id=row.id,
            tenant_id=row.tenant_id,
            label=row.label,
            pdq=row.pdq,
            check_id=row.check_id,
            image_sha256=row.image_sha256,
            decision_id=row.decision_id,
            decided_by=row.decided_by,
            created_at=row.created_at,
        )  # fmt: skip
        for row in session.scalars(query)
    ]


def purge(session: Session, older_than: timedelta, limit: int) -> int:
    """Deletes up to `limit` near hashes recorded `older_than` ago, read through their `created_at` index.
    Returns how many; the caller repeats.

    Bank entries are not purged: decisions have no retention in the ledger, so an entry stays until its
    decision is withdrawn (`bank_remove`)."""
    model = NearHashRow
    batch = sa.select(model.id).where(model.created_at < utcnow() - older_than).limit(limit)
    return session.execute(sa.delete(model).where(model.id.in_(batch))).rowcount or 0


def _candidates(session: Session, model: type, columns: tuple, where: list, hashes: dict[str, bytes], distance: int):
    """The rows that may lie within `distance` of some hash: those sharing a probe key (PostgreSQL), or all of
    `where` (SQLite). A row sharing keys of several slices comes once for each (`_closest` takes it once)."""
    if not 0 <= distance <= MAX_PROBE_DISTANCE:
        raise ValueError(f"max_distance must be 0..{MAX_PROBE_DISTANCE}, not {distance}")
    if not hashes:
        return []
    if session.get_bind().dialect.name != "postgresql":
        return session.execute(sa.select(*columns).where(*where)).all()
    probes = sorted({key for pdq in hashes.values() for key in probe_keys(pdq, distance)})
    _prefer_the_index(session)
    return session.execute(_probe_query(model, columns, where), {"probes": probes}).all()


def _prefer_the_index(session: Session) -> None:
    """Tells PostgreSQL, once per transaction, to read the GIN index rather than the table. Array elements that are
    all different leave it no statistics, so it guesses that each slice of probes matches 0.5% of the rows: at ten
    million hashes that is a full (parallel) scan of the table per lookup (over 38 s measured), where the index
    finds the few true candidates. `SET LOCAL` ends with the transaction; its other statements are index reads."""
    transaction = session.get_transaction()  # the object itself, not its id(): an id is reused once it is freed
    if session.info.get("near_index_preferred") is not transaction:
        session.execute(sa.text("SET LOCAL enable_seqscan = off"))
        session.info["near_index_preferred"] = transaction


def _probe_query(model: type, columns: tuple, where: list) -> sa.Select:
    """`chunks && probes` a slice of `PROBE_SLICE` probes at a time (a LATERAL per slice), each slice read from
    the GIN index.

    Not one `&&` of every probe: matching a row against an array costs its length, so a GIN scan of n probes
    costs about n² (4,232 probes, one hash at distance 23: 24 ms; 135,424, 32 hashes: 21 s, on 200,000 rows),
    and with n constants the planner expects every row to match and reads the whole table instead. A slice is
    an expression the planner cannot read: it estimates a few rows and takes the index. On 1,000,000 hashes
    (tests/bench/bench_pdq.py, a shared 2-core machine): at distance 23 (4,232 probes a hash) 71 ms for one
    hash and 2.2 s for 32; at 15 (264 a hash) 5 ms and 160 ms.

    At 10,000,000 the planner would rather scan the table: see `_prefer_the_index`."""
    probes = sa.bindparam("probes", type_=postgresql.ARRAY(sa.BigInteger))
    starts = sa.func.generate_series(1, sa.func.cardinality(probes), PROBE_SLICE).table_valued("i").render_derived("g")
    piece = Grouping(probes)[starts.c.i : starts.c.i + PROBE_SLICE - 1]  # (probes)[i:j]: PostgreSQL wants them
    matches = sa.select(*columns).where(*where, model.chunks.overlap(piece)).lateral("m")
    return sa.select(matches).select_from(starts.join(matches, sa.true()))


def _closest(rows: list, hashes: dict[str, bytes], max_distance: int) -> dict[str, tuple]:
    """Each hash's closest row within `max_distance` and its distance; of equally close rows, the newest."""
    best: dict[str, tuple] = {}
    for key, pdq in hashes.items():
        ranked = [(hamming(pdq, row.pdq), -row.created_at.timestamp(), index) for index, row in enumerate(rows)]
        within = [rank for rank in ranked if rank[0] <= max_distance]
        if within:
            distance, _, index = min(within)
            best[key] = (rows[index], distance)
    return best
