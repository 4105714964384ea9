"""Claims over a mixed ledger, on both databases: queued and expired-lease checks of both priorities together.

On PostgreSQL a claim picks the two apart, each by its own index, and merges them (see `claim_rows`): these
check that the merge keeps the claim order and the limit, that nothing unclaimable slips in, that concurrent
claimers still never share a row, and that the plan reads indexes rather than the table.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from pipeline.core.results import PipelineVersion
from worker.ledger import partitions
from worker.ledger.models import CheckRow, new_id
from worker.ledger.states import CheckStatus, Priority
from worker.ledger.store import Lease, Ledger

VERSION = PipelineVersion(caption="blip:a", ground="gdino:b", embed="clip:c", head="head:mix")
OTHER_VERSION = PipelineVersion(caption="blip:a", ground="gdino:b", embed="clip:c", head="head:other")
MAX_ATTEMPTS = 3
CLAIMABLE = ("ready", "expired")
UNCLAIMABLE = ("live", "not_due", "used_up", "done")


def _state(state: str, now: datetime) -> dict:
    """The columns that make a check claimable or not."""
    expired, later = now - timedelta(minutes=1), now + timedelta(hours=1)
    return {
        "ready": {"status": CheckStatus.queued, "attempts": 0},
        "not_due": {"status": CheckStatus.queued, "attempts": 1, "available_at": later},  # a retry waiting
        "expired": {"status": CheckStatus.running, "attempts": 1, "lease_expires_at": expired},  # its worker died
        "live": {"status": CheckStatus.running, "attempts": 1, "lease_expires_at": later},
        "used_up": {"status": CheckStatus.running, "attempts": MAX_ATTEMPTS, "lease_expires_at": expired},
        "done": {"status": CheckStatus.done, "attempts": 1},
    }[state]


def _check(name: str, state: str, priority: int, age_s: float, now: datetime, version=VERSION) -> dict:
    created = now - timedelta(seconds=age_s)
    row = {
        "id": new_id(),
        "external_id": name,
        "pipeline_version_id": version.id,
        "source": {"url": f"https://x/{name}"},
        "priority": priority,
        "created_at": created,
        "available_at": created,
        "updated_at": created,
    }
    return row | _state(state, now)


def _insert(ledger: Ledger, rows: list[dict]) -> dict[str, str]:
    """Writes the rows; returns {external id: check id}."""
    with ledger.session() as session:
        for version in (VERSION, OTHER_VERSION):
            ledger.ensure_pipeline_version(session, version, "tiny")
        session.execute(sa.insert(CheckRow), rows)
    return {row["external_id"]: row["id"] for row in rows}


def _claim(ledger: Ledger, limit: int, priority: int | None = None, lease: Lease | None = None) -> list[CheckRow]:
    with ledger.session() as session:
        return ledger.claim(
            session,
            pipeline_version_id=VERSION.id,
            limit=limit,
            lease=lease or Lease.new("test:mix", 60),
            max_attempts=MAX_ATTEMPTS,
            priority=priority,
        )


def _mixed(now: datetime) -> list[dict]:
    """Of each priority, one check in each state; re-scores older than every fresh check, so age alone would
    put them first. Plus a ready fresh check of another version."""
    rows = [
        _check(f"{label}-{state}", state, priority, age_s=base + offset, now=now)
        for label, priority, base in (("fresh", Priority.fresh, 0), ("rescore", Priority.rescore, 1000))
        for offset, state in enumerate(("ready", "live", "expired", "not_due", "used_up", "done"))
    ]
    return [*rows, _check("elsewhere-ready", "ready", Priority.fresh, age_s=5000, now=now, version=OTHER_VERSION)]


def _one_at_a_time(ledger: Ledger, claims: int, priority: int | None = None) -> list[str | None]:
    """The external id each of `claims` claims of one check took: the claim order (a batch's rows come back in
    no particular order)."""
    taken = [_claim(ledger, 1, priority) for _ in range(claims)]
    return [rows[0].external_id if rows else None for rows in taken]


def test_a_claim_takes_lower_priorities_first_then_the_oldest_queued_or_expired(ledger):
    _insert(ledger, _mixed(datetime.now(UTC)))
    order = ["fresh-expired", "fresh-ready", "rescore-expired", "rescore-ready"]
    assert _one_at_a_time(ledger, 5) == [*order, None]  # live leases, retries not due, attempts used up: left alone


def test_a_batch_is_the_first_checks_in_claim_order(ledger):
    _insert(ledger, _mixed(datetime.now(UTC)))
    first = _claim(ledger, limit=3)
    assert {row.external_id for row in first} == {"fresh-expired", "fresh-ready", "rescore-expired"}
    assert all(row.status == CheckStatus.running and row.lease_owner == "test:mix" for row in first)
    assert all(row.attempts == (2 if "expired" in row.external_id else 1) for row in first)


def test_a_claim_of_one_priority_takes_only_that_one(ledger):
    _insert(ledger, _mixed(datetime.now(UTC)))
    assert _one_at_a_time(ledger, 3, Priority.rescore) == ["rescore-expired", "rescore-ready", None]
    assert _one_at_a_time(ledger, 3, Priority.fresh) == ["fresh-expired", "fresh-ready", None]


def test_a_claim_never_takes_more_than_its_limit(ledger):
    """Both picks find more than the limit: their union is cut, and no row is changed beyond what is returned."""
    now = datetime.now(UTC)
    rows = [
        _check(f"{state}-{priority}-{i}", state, priority, age_s=i, now=now)
        for state in CLAIMABLE
        for priority in (Priority.fresh, Priority.rescore)
        for i in range(10)
    ]
    _insert(ledger, rows)
    for limit in (1, 4, 7):
        lease = Lease.new("test:limit", 60)
        claimed = _claim(ledger, limit, lease=lease)
        with ledger.session() as session:
            held = session.scalar(sa.select(sa.func.count()).where(CheckRow.lease_token == lease.token))
        assert len(claimed) == held == limit
        assert {row.priority for row in claimed} == {Priority.fresh}


def test_concurrent_claimers_never_share_a_check_queued_or_expired(ledger):
    now = datetime.now(UTC)
    rows = [
        _check(f"{state}-{priority}-{i}", state, priority, age_s=i, now=now)
        for state in (*CLAIMABLE, *UNCLAIMABLE)
        for priority in (Priority.fresh, Priority.rescore)
        for i in range(8)
    ]
    ids = _insert(ledger, rows)
    claimable = {ids[row["external_id"]] for row in rows if row["external_id"].startswith(CLAIMABLE)}
    claimed: list[list[str]] = [[] for _ in range(4)]

    def claimer(slot: int) -> None:
        for _ in range(6):
            claimed[slot] += [row.id for row in _claim(ledger, 2, lease=Lease.new(f"test:{slot}", 60))]

    threads = [threading.Thread(target=claimer, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [check_id for part in claimed for check_id in part]
    assert len(everything) == len(set(everything))  # no check in two batches
    assert set(everything) == claimable


# ---------------------------------------------------------------------- the plan (PostgreSQL)


def _claim_statement(ledger: Ledger, priority: int | None) -> tuple[str, dict]:
    """The UPDATE `Ledger.claim` sends, as the driver got it."""
    sent = []

    def record(_connection, _cursor, statement, parameters, _context, _many) -> None:
        if "UPDATE checks" in statement:
            sent.append((statement, parameters))

    event.listen(ledger.engine, "before_cursor_execute", record)
    try:
        _claim(ledger, 16, priority)
    finally:
        event.remove(ledger.engine, "before_cursor_execute", record)
    return sent[-1]


def _plan_nodes(plan: dict) -> list[dict]:
    return [plan, *(node for child in plan.get("Plans", []) for node in _plan_nodes(child))]


def _reads_checks(node: dict) -> bool:
    return any(partitions.is_partition_name(below.get("Relation Name", "")) for below in _plan_nodes(node))


_PARENT_INDEXES = (  # a day's index → the index of `checks` it is a partition of
    "SELECT c.relname, p.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
    "JOIN pg_class p ON p.oid = i.inhparent WHERE c.relkind = 'i'"
)


@pytest.mark.parametrize("priority", [Priority.fresh, Priority.rescore, None])
def test_the_claim_plan_reads_indexes_not_the_table(ledger, priority):
    """A few thousand checks after ANALYZE: each pick walks its partial claim index in claim order (no sequential
    scan, no sort of what it matches), as it does behind a million (tests/bench/bench_claim.py)."""
    if ledger.engine.dialect.name != "postgresql":
        pytest.skip("SQLite claims in one pick; its plan is not this one")
    now = datetime.now(UTC)
    rows = [_check(f"old-{i}", "done", Priority.fresh, 9000 + i, now, OTHER_VERSION) for i in range(3000)]
    rows += [_check(f"rescore-{i}", "ready", Priority.rescore, 5000 - i, now) for i in range(2000)]
    rows += [_check(f"fresh-{i}", "ready", Priority.fresh, 500 - i, now) for i in range(500)]
    rows += [_check(f"{state}-{i}", state, i % 2, 3000 + i, now) for state in UNCLAIMABLE[:3] for i in range(10)]
    rows += [_check(f"expired-{i}", "expired", i % 2, 3000 + i, now) for i in range(10)]
    _insert(ledger, rows)
    with ledger.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("ANALYZE checks")
    statement, parameters = _claim_statement(ledger, priority)
    with ledger.engine.connect() as connection:
        [document] = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {statement}", parameters).scalar_one()
        parents = dict(connection.exec_driver_sql(_PARENT_INDEXES).all())
    nodes = _plan_nodes(document["Plan"])
    # `checks` is partitioned by day: the rows are in today's partition, and the other days' are empty (the
    # planner may read an empty one by a scan: nothing is there)
    today = partitions.partition_name("checks", now.date())
    reads = [node for node in nodes if node.get("Relation Name") == today and node["Node Type"] != "ModifyTable"]
    assert "Seq Scan" not in {node["Node Type"] for node in reads}
    used = {parents[index] for node in nodes if (index := node.get("Index Name")) in parents}
    assert {"ix_checks_claim_queued", "ix_checks_claim_running", "pk_checks"} <= used  # pk_checks: the UPDATE
    queued = [node for node in reads if parents.get(node.get("Index Name")) == "ix_checks_claim_queued"]
    assert queued and all(node["Node Type"] == "Index Scan" for node in queued)  # walked in claim order
    # No sort of what a claim matches, but of the expired leases among the checks in flight (the running index
    # leaves `lease_expires_at` out so that renewing a lease is a HOT update): a few batches' worth at most
    for sort in (node for node in nodes if node["Node Type"] == "Sort" and _reads_checks(node)):
        below = {parents.get(node.get("Index Name")) for node in _plan_nodes(sort) if node.get("Index Name")}
        assert below <= {"ix_checks_claim_running"}, below
