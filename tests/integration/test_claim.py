"""Claiming batches from the ledger, on both databases: bounded, under a lease, never shared, fresh first."""

from __future__ import annotations

import threading

import pytest
import sqlalchemy as sa

from pipeline.core.detector import Detector
from pipeline.core.profiles import get_profile
from tests.conftest import random_head
from worker.gpu.batches import CheckService
from worker.ledger.models import CheckRow
from worker.ledger.states import Priority
from worker.ledger.store import Lease
from worker.settings import Settings


@pytest.fixture
def service(ledger, tiny_store):
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    detector.use_head(random_head(detector))
    settings = Settings(batch_size=4, batch_max_wait_s=0, database_url="sqlite://")
    svc = CheckService(settings, ledger, detector)
    svc.register_version()
    return svc


def _queue(service: CheckService, n: int, prefix: str = "c") -> list[str]:
    with service.ledger.session() as session:
        return [
            service.ledger.create_check(
                session, external_id=f"{prefix}{i}", pipeline_version_id=service.version_id, source={"url": "http://x/"}
            )[0].id
            for i in range(n)
        ]


def test_a_batch_is_bounded_oldest_first_and_held_by_its_lease(service):
    ids = _queue(service, 12)
    lease = Lease.new("test:1", 30)
    batch = service.claim_batch(lease)
    assert [c.id for c in batch] == ids[:4]
    assert all(c.status == "running" and c.attempts == 1 and c.lease_token == lease.token for c in batch)
    assert all(c.lease_owner == "test:1" and c.lease_expires_at > c.started_at for c in batch)


def test_claims_drain_the_queue_without_overlap(service):
    ids = _queue(service, 10)
    seen = [c.id for _ in range(3) for c in service.claim_batch(Lease.new("test:1", 30))]
    assert sorted(seen) == sorted(ids)


def test_fresh_uploads_go_before_re_scores(service):
    [rescore] = _queue(service, 1, "old")
    with service.ledger.session() as session:  # filed first, but a re-score
        session.execute(sa.update(CheckRow).where(CheckRow.id == rescore).values(priority=Priority.rescore))
    fresh = _queue(service, 2, "fresh")
    assert {c.id for c in service.claim_batch(Lease.new("test:1", 30))} == set(fresh)
    assert [c.id for c in service.claim_batch(Lease.new("test:1", 30))] == [rescore]


def test_concurrent_claims_never_share_a_check(service):
    ids = _queue(service, 40)
    claimed: list[list[str]] = [[] for _ in range(4)]

    def claimer(slot: int) -> None:
        for _ in range(6):
            claimed[slot] += [c.id for c in service.claim(Lease.new(f"test:{slot}", 30), 3, Priority.fresh)]

    threads = [threading.Thread(target=claimer, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [check_id for part in claimed for check_id in part]
    assert len(everything) == len(set(everything))  # no check in two batches
    assert set(everything) == set(ids)
