"""Claiming a batch from the ledger, on both databases: bounded, includes the asking check, never shared."""

from __future__ import annotations

import threading

import pytest

from pipeline.core.detector import Detector
from pipeline.core.profiles import get_profile
from tests.conftest import random_head
from worker.service import CheckService
from worker.settings import Settings


@pytest.fixture
def service(ledger, tiny_store):
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    detector.use_head(random_head(detector))
    settings = Settings(batch_size=4, batch_max_wait_s=0, database_url="sqlite://")
    svc = CheckService(settings, ledger, detector, enqueue=lambda kwargs, countdown, queue: None)
    svc.register_version()
    return svc


def _queue(service: CheckService, n: int) -> list[str]:
    with service.ledger.session() as session:
        return [
            service.ledger.create_check(
                session, external_id=f"c{i}", pipeline_version_id=service.version_id, source={"url": "http://x/"}
            )[0].id
            for i in range(n)
        ]


def test_claim_is_bounded_and_includes_the_asking_check(service):
    ids = _queue(service, 12)
    batch = service.claim(ids[9])
    assert len(batch) == 4 and ids[9] in {c.id for c in batch}
    assert all(c.status == "running" and c.attempts == 1 for c in batch)
    assert service.claim(ids[9]) == [] or ids[9] not in {c.id for c in service.claim(ids[9])}


def test_claims_drain_the_queue_without_overlap(service):
    ids = _queue(service, 10)
    seen = [c.id for _ in range(3) for c in service._claim_once(None, 4)]
    assert sorted(seen) == sorted(ids)


def test_concurrent_claims_never_share_a_check(service):
    ids = _queue(service, 40)
    claimed: list[list[str]] = [[] for _ in range(4)]

    def claimer(slot: int) -> None:
        for _ in range(6):
            claimed[slot] += [c.id for c in service._claim_once(None, 3)]

    threads = [threading.Thread(target=claimer, args=(slot,)) for slot in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [check_id for part in claimed for check_id in part]
    assert len(everything) == len(set(everything))  # no check in two batches
    assert set(everything) == set(ids)
