"""Claims shared fairly across tenants (`claims.FairShare`), on both databases: one tenant's flood cannot starve
another, weights set the shares, a tenant's own checks keep their order, slots a tenant cannot fill go to the
others, an idle tenant banks at most one claim of credit, and concurrent claimers still never share a check."""

from __future__ import annotations

import threading
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from pipeline.core.results import PipelineVersion
from worker.ledger import tenants
from worker.ledger.claims import FairShare
from worker.ledger.models import CheckRow, new_id
from worker.ledger.states import CheckStatus, Priority
from worker.ledger.store import Lease, Ledger

VERSION = PipelineVersion(caption="blip:a", ground="gdino:b", embed="clip:c", head="head:fair")


def _queue(ledger: Ledger, tenant: str, n: int, *, age_s: float, priority: int = Priority.fresh, **extra) -> None:
    """`n` ready checks of `tenant`, the first the oldest (`age_s` old), one second apart."""
    assert age_s > n, "every check is made in the past, so it is due"
    now = datetime.now(UTC)
    rows = []
    for i in range(n):
        created = now - timedelta(seconds=age_s - i)
        rows.append({
            "id": new_id(), "tenant_id": tenant, "external_id": f"{tenant}-{i}", "pipeline_version_id": VERSION.id,
            "source": {"url": f"https://x/{tenant}/{i}"}, "priority": priority, "status": CheckStatus.queued,
            "attempts": 0, "created_at": created, "available_at": created, "updated_at": created, **extra,
        })  # fmt: skip
    with ledger.session() as session:
        session.execute(sa.insert(CheckRow), rows)


@pytest.fixture
def ledger(ledger: Ledger) -> Ledger:
    with ledger.session() as session:
        ledger.ensure_pipeline_version(session, VERSION, "tiny")
        for tenant, weight in (("a", 1), ("b", 1), ("heavy", 3)):
            tenants.create_tenant(session, tenant, tenants.TenantLimits(weight=weight))
    return ledger


def _claim(ledger: Ledger, fair: FairShare, limit: int, priority: int | None = Priority.fresh) -> list[CheckRow]:
    with ledger.session() as session:
        return ledger.claim(
            session, pipeline_version_id=VERSION.id, limit=limit, lease=Lease.new("test:fair", 60), max_attempts=3,
            priority=priority, fair=fair,
        )  # fmt: skip


def test_a_flood_of_one_tenant_leaves_another_its_share_in_order(ledger):
    _queue(ledger, "a", 300, age_s=3000)  # the flood: every one older than b's
    _queue(ledger, "b", 12, age_s=100)
    fair = FairShare()
    first = _claim(ledger, fair, 8)
    assert Counter(row.tenant_id for row in first) == {"a": 4, "b": 4}
    b_taken = [row.external_id for row in first if row.tenant_id == "b"]
    assert b_taken == ["b-0", "b-1", "b-2", "b-3"]  # a tenant's own checks: oldest first
    second = _claim(ledger, fair, 8)
    assert Counter(row.tenant_id for row in second) == {"a": 4, "b": 4}
    third = _claim(ledger, fair, 8)  # b has 4 left: its unfilled slots go to a, in the same claim
    assert Counter(row.tenant_id for row in third) == {"a": 4, "b": 4}
    fourth = _claim(ledger, fair, 8)
    assert Counter(row.tenant_id for row in fourth) == {"a": 8}


def test_weights_set_the_shares(ledger):
    _queue(ledger, "heavy", 200, age_s=250)
    _queue(ledger, "a", 200, age_s=5000)
    fair = FairShare()
    taken = Counter(row.tenant_id for _ in range(10) for row in _claim(ledger, fair, 8))
    assert taken == {"heavy": 60, "a": 20}


def test_a_tenant_short_of_its_share_gives_the_rest_to_the_others(ledger):
    _queue(ledger, "a", 50, age_s=500)
    _queue(ledger, "b", 2, age_s=400)
    _queue(ledger, "heavy", 3, age_s=300, available_at=datetime.now(UTC) + timedelta(hours=1))  # retries, not due
    rows = _claim(ledger, FairShare(), 16)
    assert Counter(row.tenant_id for row in rows) == {"a": 14, "b": 2}


def test_an_idle_tenant_banks_at_most_one_claim_of_credit(ledger):
    _queue(ledger, "a", 400, age_s=5000)
    fair = FairShare()
    for _ in range(20):  # a alone for a while: b's unused share is not saved up
        assert len(_claim(ledger, fair, 8)) == 8
    _queue(ledger, "b", 100, age_s=110)
    taken = [Counter(row.tenant_id for row in _claim(ledger, fair, 8)) for _ in range(6)]
    assert taken[0] == {"b": 8}  # back from idle: served at once...
    assert all(counts == {"a": 4, "b": 4} for counts in taken[2:])  # ...then its share, never a's whole


def test_priorities_are_kept_within_the_fair_claim(ledger):
    _queue(ledger, "a", 10, age_s=100)
    _queue(ledger, "b", 10, age_s=9000, priority=Priority.rescore)
    assert {row.tenant_id for row in _claim(ledger, FairShare(), 8, Priority.fresh)} == {"a"}
    rows = _claim(ledger, FairShare(), 4, priority=None)  # one claim of both: each tenant's lower priority first
    assert all(row.priority == Priority.fresh for row in rows if row.tenant_id == "a")


def test_one_tenant_claims_as_before(ledger):
    """Only the default tenant with work: no slot is lost to tenants without any."""
    _queue(ledger, "default", 40, age_s=100)
    rows = _claim(ledger, FairShare(), 32)
    assert [row.external_id for row in sorted(rows, key=lambda row: row.created_at)] == [
        f"default-{i}" for i in range(32)
    ]


def test_concurrent_fair_claimers_never_share_a_check(ledger, database_url):
    if ledger.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serialises writers: no two claims run at once")
    for tenant, age in (("a", 900), ("b", 800), ("heavy", 700)):
        _queue(ledger, tenant, 120, age_s=age)
    taken: list[str] = []
    lock = threading.Lock()

    def claimer() -> None:
        own, fair = Ledger(database_url), FairShare()
        try:
            while rows := _claim(own, fair, 7):
                with lock:
                    taken.extend(row.id for row in rows)
        finally:
            own.dispose()

    threads = [threading.Thread(target=claimer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(taken) == len(set(taken)) == 360


def test_rescore_pages_keep_every_tenants_upload_of_a_shared_external_id(ledger):
    """Pages of re-score candidates go by external id; two tenants' uploads of one id are two candidates, and a
    page that ends between them must not let the next page (after that id) skip the second."""
    from worker.ledger.rescores import RescoreSelection, rescore_candidates

    old = PipelineVersion(caption="blip:a", ground="gdino:b", embed="clip:c", head="head:old")
    now = datetime.now(UTC)
    with ledger.session() as session:
        ledger.ensure_pipeline_version(session, old, "tiny")
        rows = [
            {"id": new_id(), "tenant_id": tenant, "external_id": f"up-{i}", "pipeline_version_id": old.id,
             "source": {}, "status": CheckStatus.done, "attempts": 1, "created_at": now, "available_at": now,
             "updated_at": now, "finished_at": now - timedelta(seconds=i + (tenant == "b"))}
            for i in range(5) for tenant in ("a", "b")
        ]  # fmt: skip
        session.execute(sa.insert(CheckRow), rows)
    seen, after = [], None
    while True:
        with ledger.session() as session:
            page = rescore_candidates(
                session, target_version_id=VERSION.id, selection=RescoreSelection(), after_external_id=after, limit=3
            )
        if not page:
            break
        seen += [(row.tenant_id, row.external_id) for row in page]
        after = page[-1].external_id
    assert sorted(seen) == sorted((tenant, f"up-{i}") for i in range(5) for tenant in ("a", "b"))
