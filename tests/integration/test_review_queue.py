"""The moderators' review queue, on SQLite and PostgreSQL: filled as checks end, taken under leases in the order of
what most needs a human, never by two moderators at once, double reviews by two different moderators."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import sqlalchemy as sa

from pipeline.core.results import PipelineVersion
from worker.ledger import review_queue, tenants
from worker.ledger.models import CheckRow, DecisionRow, ReviewItemRow, TenantRow, new_id, utcnow
from worker.ledger.retention import Policy, maintain
from worker.ledger.review_queue import LeaseLost, ReviewError
from worker.ledger.reviews import record_decision
from worker.ledger.states import Priority
from worker.ledger.store import Ledger
from worker.settings import Settings

VERSION = PipelineVersion(caption="blip:a", ground="gdino:b", embed="clip:c", head="head:review")


@pytest.fixture
def queue(ledger: Ledger) -> Ledger:
    with ledger.session() as session:
        session.execute(sa.delete(ReviewItemRow))
        session.execute(sa.delete(TenantRow).where(TenantRow.id != "default"))
        ledger.ensure_pipeline_version(session, VERSION, "tiny")
        tenants.create_tenant(session, "acme")
    return ledger


def _done(ledger: Ledger, results: list[tuple[str, float]], *, tenant: str = "default", share: float = 0.0,
          priority: int = Priority.fresh) -> list[str]:  # fmt: skip
    """Checks of `tenant` ended done through `finish_done_many`, one per (verdict, p_fake); their ids, in order."""
    token = new_id()
    with ledger.session() as session:
        new = [
            ledger.create_check(session, external_id=f"{tenant}-{new_id()}", pipeline_version_id=VERSION.id,
                                source={"url": "https://x/"}, tenant_id=tenant)[0].id
            for _ in results
        ]  # fmt: skip
        running = {"status": "running", "lease_token": token, "priority": priority}
        session.execute(sa.update(CheckRow).where(CheckRow.id.in_(new)).values(**running))
        outcomes = {
            check_id: {"p_fake": p, "verdict": verdict, "threshold": 0.6, "threshold_low": 0.4, "caption": "a cat",
                       "objects": [], "object_count": 0, "timings_ms": None, "image_sha256": None}
            for check_id, (verdict, p) in zip(new, results, strict=True)
        }  # fmt: skip
        assert len(ledger.finish_done_many(session, token, outcomes, review_double_share=share)) == len(new)
    return new


def _take(ledger: Ledger, moderator: str, tenant: str | None = "default", lease_s: float = 60):
    with ledger.session() as session:
        return review_queue.take_next(session, moderator, tenant, lease_s)


def _decide(ledger: Ledger, item, moderator: str, label: str = "ai_generated") -> None:
    with ledger.session() as session:
        review_queue.decide(session, item.check_id, item.lease_token, label, moderator, f"name-{moderator}")


def _work_through(ledger: Ledger, moderator: str, tenant: str | None = "default") -> list[str]:
    seen = []
    while (item := _take(ledger, moderator, tenant)) is not None:
        seen.append(item.check_id)
        _decide(ledger, item, moderator)
    return seen


def test_uncertain_first_then_highest_p_fake_then_oldest_per_tenant(queue):
    # given: done checks of two tenants, a real one and a re-score among them
    fake_07, _real, uncertain_045 = _done(queue, [("fake", 0.7), ("real", 0.1), ("uncertain", 0.45)])
    fake_09a, uncertain_055 = _done(queue, [("fake", 0.9), ("uncertain", 0.55)])
    time.sleep(0.01)
    [fake_09b] = _done(queue, [("fake", 0.9)])  # as likely as fake_09a, queued later
    _done(queue, [("fake", 0.99)], priority=Priority.rescore)
    [acme] = _done(queue, [("uncertain", 0.5)], tenant="acme")
    # when / then: a default moderator gets default's items only, in queue order
    assert _work_through(queue, "kmod1") == [uncertain_055, uncertain_045, fake_09a, fake_09b, fake_07]
    assert _work_through(queue, "kmod2", "acme") == [acme]


def test_an_operator_works_every_tenant_in_one_merged_order(queue):
    [fake] = _done(queue, [("fake", 0.95)])
    [acme] = _done(queue, [("uncertain", 0.42)], tenant="acme")
    [uncertain] = _done(queue, [("uncertain", 0.58)])
    assert _work_through(queue, "kop", tenant=None) == [uncertain, acme, fake]


def test_a_reload_returns_the_held_item_and_an_expired_lease_is_taken_over(queue):
    first, second = _done(queue, [("uncertain", 0.5), ("fake", 0.8)])
    held = _take(queue, "kmod1", lease_s=0.2)
    again = _take(queue, "kmod1", lease_s=0.2)
    assert (again.check_id, again.lease_token) == (held.check_id, held.lease_token) == (first, held.lease_token)
    assert _take(queue, "kmod2").check_id == second  # the held one is not offered to another moderator
    time.sleep(0.3)
    taken_over = _take(queue, "kmod3")
    assert taken_over.check_id == first and taken_over.lease_token != held.lease_token
    with pytest.raises(LeaseLost, match="another moderator took it"):
        _decide(queue, held, "kmod1")
    _decide(queue, taken_over, "kmod3", "authentic")
    with queue.session() as session:
        decisions = list(session.scalars(sa.select(DecisionRow).where(DecisionRow.check_id == first)))
    assert [(d.key_id, d.label, d.tenant_id) for d in decisions] == [("kmod3", "authentic", "default")]
    with pytest.raises(ReviewError, match="is one of"), queue.session() as session:
        review_queue.decide(session, second, "t", "<b>maybe</b>", "kmod2", "x")


def test_a_double_review_goes_to_a_different_moderator_and_counts_agreement(queue):
    [check_id] = _done(queue, [("fake", 0.9)], share=1.0)
    assert review_queue.needs_two(check_id, 1.0) and not review_queue.needs_two(check_id, 0.0)
    _decide(queue, _take(queue, "kmod1"), "kmod1", "ai_generated")
    assert _take(queue, "kmod1") is None  # not twice by the same moderator
    second = _take(queue, "kmod2")
    assert second.check_id == check_id and second.reviews_done == 1
    _decide(queue, second, "kmod2", "ai_generated")
    assert _take(queue, "kmod3") is None  # two reviews done: out of the queue
    with queue.session() as session:
        agreement = review_queue.agreement(session, "default", utcnow() - timedelta(days=7))
        counts = review_queue.moderator_counts(session, "default", utcnow())
        other = review_queue.agreement(session, "acme", utcnow() - timedelta(days=7))
    assert (agreement.items, agreement.agreeing, agreement.share) == (1, 1, 1.0)
    assert other.items == 0 and other.share is None
    assert sorted((c.key_id, c.last_hour, c.last_day) for c in counts) == [("kmod1", 1, 1), ("kmod2", 1, 1)]
    assert review_queue.cohens_kappa([("a", "a"), ("b", "b"), ("a", "b"), ("b", "b")]) == pytest.approx(0.5)


def test_skipping_gives_the_item_to_the_others_and_a_check_page_decision_counts(queue):
    first, second = _done(queue, [("uncertain", 0.5), ("fake", 0.8)])
    held = _take(queue, "kmod1")
    with queue.session() as session:
        assert review_queue.skip(session, held.check_id, held.lease_token, "kmod1")
    assert _take(queue, "kmod1").check_id == second  # not the skipped one again, for a while
    assert _take(queue, "kmod2").check_id == first  # given to the others at once
    with queue.session() as session:  # kmod1 decides the one it holds on the check page instead
        record_decision(session, second, "authentic", "name-kmod1", "kmod1")
        assert review_queue.get_item(session, second).reviews_done == 1
        assert review_queue.get_item(session, second).lease_token is None


def test_retention_deletes_reviewed_and_expired_items_only(queue):
    reviewed, young, old = _done(queue, [("uncertain", 0.5), ("fake", 0.8), ("fake", 0.7)])
    _decide(queue, _take(queue, "kmod1"), "kmod1")  # the first in the queue: the uncertain one
    with queue.session() as session:
        aged = utcnow() - timedelta(days=31)
        session.execute(sa.update(ReviewItemRow).where(ReviewItemRow.check_id == old).values(created_at=aged))
    with queue.session() as session:
        assert review_queue.purge(session, timedelta(days=30), limit=1) == 1  # bounded
    policy = Policy.from_settings(Settings(database_url="sqlite://"))  # the maintenance leader's pass
    assert policy.days["review_items"] == 30
    assert maintain(queue.engine, policy, progress=lambda _line: None).review_items_deleted == 1
    with queue.session() as session:
        kept = list(session.scalars(sa.select(ReviewItemRow.check_id)))
    assert kept == [young] and reviewed not in kept


def test_two_moderators_taking_at_once_never_get_the_same_item(queue):
    if queue.engine.dialect.name != "postgresql":
        pytest.skip("concurrent takers: PostgreSQL (SQLite serialises every writer)")
    items = set(_done(queue, [("fake", 0.5 + i / 100) for i in range(24)]))
    taken: dict[str, list[str]] = {}
    start = threading.Barrier(6)

    def moderate(moderator: str) -> None:
        start.wait()
        taken[moderator] = _work_through(queue, moderator)

    threads = [threading.Thread(target=moderate, args=(f"kmod{i}",)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    everything = [check_id for seen in taken.values() for check_id in seen]
    assert len(taken) == 6 and sorted(everything) == sorted(items)  # each item reviewed once, none twice
    assert sum(1 for seen in taken.values() if seen) > 1  # the moderators did work side by side
