"""The near-duplicate index and the bank, on SQLite and PostgreSQL: closest wins, tenants and versions apart."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
import sqlalchemy as sa

from worker.ledger import near
from worker.ledger.models import utcnow
from worker.ledger.near import BankMatch, NearEntry, NearMatch
from worker.ledger.near_rows import BankEntryRow, NearHashRow

RNG = random.Random(27)
BASE = RNG.randbytes(32)


def _near(pdq: bytes, bits: int, offset: int = 0) -> bytes:
    """`pdq` with `bits` bits flipped, from bit `offset` on (spread over the chunks)."""
    value = int.from_bytes(pdq, "big")
    for bit in range(bits):
        value ^= 1 << ((offset + bit * 37) % 256)
    return value.to_bytes(32, "big")


def _entry(check_id: str, pdq: bytes, tenant: str = "t1", version: str = "pv-a", age_s: float = 0) -> NearEntry:
    return NearEntry(tenant, version, check_id, f"sha-{check_id}", pdq, utcnow() - timedelta(seconds=age_s))


@pytest.fixture
def session(migrated_ledger):
    with migrated_ledger.session() as session:
        session.execute(sa.delete(NearHashRow))
        session.execute(sa.delete(BankEntryRow))
    with migrated_ledger.session() as session:
        yield session


def test_find_returns_the_closest_within_the_distance(session):
    near.record(session, [_entry("far", _near(BASE, 20)), _entry("close", _near(BASE, 6)), _entry("x", BASE[::-1])])
    queries = {"q": BASE, "unrelated": RNG.randbytes(32), "edge": _near(BASE, 6)}
    found = near.find(session, "t1", "pv-a", queries, max_distance=23)
    assert found == {"q": NearMatch("close", "sha-close", 6), "edge": NearMatch("close", "sha-close", 0)}
    assert near.find(session, "t1", "pv-a", {"q": BASE}, max_distance=5) == {}
    assert near.find(session, "t1", "pv-a", {"q": BASE}, max_distance=6)["q"].distance == 6  # inclusive
    assert near.find(session, "t1", "pv-a", {}, max_distance=23) == {}


def test_of_equally_close_entries_the_newest_wins(session):
    near.record(session, [_entry("old", _near(BASE, 4), age_s=60), _entry("new", _near(BASE, 4, 1))])
    assert near.find(session, "t1", "pv-a", {"q": BASE}, 23)["q"].check_id == "new"


def test_tenants_and_versions_apart_and_exclude_shas(session):
    near.record(
        session,
        [_entry("other-tenant", BASE, tenant="t2"), _entry("other-version", BASE, version="pv-b"),
         _entry("same-bytes", BASE), _entry("copy", _near(BASE, 10))],
    )  # fmt: skip
    assert near.find(session, "t1", "pv-a", {"q": BASE}, 23)["q"] == NearMatch("same-bytes", "sha-same-bytes", 0)
    found = near.find(session, "t1", "pv-a", {"q": BASE}, 23, exclude_shas={"sha-same-bytes"})
    assert found["q"] == NearMatch("copy", "sha-copy", 10)
    assert near.find(session, "t3", "pv-a", {"q": BASE}, 23) == {}
    assert near.find(session, "t2", "pv-b", {"q": BASE}, 23) == {}


def test_max_distance_is_limited(session):
    with pytest.raises(ValueError):
        near.find(session, "t1", "pv-a", {"q": BASE}, 24)


def test_bank_put_replaces_and_remove(session):
    near.bank_put(session, "t1", "fake", "c1", "sha-1", _near(BASE, 8), "d1", "alice")
    near.bank_put(session, "t1", "real", "c2", "sha-2", _near(BASE, 30), "d2", None)
    near.bank_put(session, "t2", "real", "c3", "sha-3", BASE, "d3", None)
    assert near.bank_find(session, "t1", {"q": BASE}, 23) == {"q": BankMatch("fake", "c1", "d1", 8)}
    near.bank_put(session, "t1", "real", "c1", "sha-1", _near(BASE, 2), "d4", "bob")  # a later decision
    assert near.bank_find(session, "t1", {"q": BASE}, 23) == {"q": BankMatch("real", "c1", "d4", 2)}
    assert len(near.bank_entries(session, "t1")) == 2
    assert near.bank_remove(session, "t1", "c1") and not near.bank_remove(session, "t1", "c1")
    assert near.bank_find(session, "t1", {"q": BASE}, 23) == {}
    with pytest.raises(ValueError):
        near.bank_put(session, "t1", "unsure", "c9", "sha-9", BASE, "d9", None)


def test_bank_entries_page_by_id(session):
    for n in range(5):
        near.bank_put(session, f"t{n % 2}", "fake", f"c{n}", f"sha-{n}", RNG.randbytes(32), f"d{n}", None)
    first = near.bank_entries(session, limit=3)
    rest = near.bank_entries(session, after_id=first[-1].id, limit=3)
    assert [entry.check_id for entry in first + rest] == [f"c{n}" for n in range(5)]
    assert [entry.check_id for entry in near.bank_entries(session, "t1")] == ["c1", "c3"]
    assert near.bank_entries(session, since=utcnow() + timedelta(seconds=5)) == []


def test_purge_deletes_old_hashes_a_batch_at_a_time(session):
    near.record(session, [_entry(f"old{n}", RNG.randbytes(32), age_s=7200) for n in range(3)] + [_entry("new", BASE)])
    assert near.purge(session, timedelta(hours=1), limit=2) == 2
    assert near.purge(session, timedelta(hours=1), limit=2) == 1
    assert near.purge(session, timedelta(hours=1), limit=2) == 0
    assert session.scalar(sa.select(sa.func.count()).select_from(NearHashRow)) == 1


def test_find_is_one_statement_for_32_hashes(session):
    near.record(session, [_entry(f"c{n}", _near(BASE, n % 20, n)) for n in range(64)])
    statements = []
    listen = lambda *args: statements.append(args[2])  # noqa: E731
    engine = session.get_bind()
    sa.event.listen(engine, "before_cursor_execute", listen)
    try:
        found = near.find(session, "t1", "pv-a", {f"q{n}": _near(BASE, n % 3, n) for n in range(32)}, 23)
        near.bank_find(session, "t1", {f"q{n}": _near(BASE, n % 3, n) for n in range(32)}, 23)
    finally:
        sa.event.remove(engine, "before_cursor_execute", listen)
    assert len(found) == 32 and all(match.distance <= 23 for match in found.values())
    # one lookup statement each; the transaction's first is preceded by the SET LOCAL keeping it on the index
    first = ["SET"] if engine.dialect.name == "postgresql" else []
    assert [statement.split()[0] for statement in statements] == [*first, "SELECT", "SELECT"]
