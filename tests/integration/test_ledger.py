"""The ledger's promises, on SQLite and PostgreSQL: one row per check, first result wins, exact artifacts."""

from __future__ import annotations

import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
import torch

from pipeline.core.results import Artifacts, Embeddings, Features, GroundedObject, PipelineVersion
from tests.conftest import decoded
from worker.ledger.models import CheckRow
from worker.ledger.states import CheckStatus
from worker.ledger.store import Lease, Ledger

VERSION = PipelineVersion(caption="blip:a", ground="gdino:b", embed="clip:c", head="head:d")
OTHER_VERSION = PipelineVersion(caption="blip:a", ground="gdino:b", embed="clip:c", head="head:e")
LONG = "x" * 300  # version keys can be far longer than the 32-character key column
KEYS = {
    "caption": f"caption:{LONG}",
    "ground": f"ground:{LONG}|after=1",
    "embed": f"embed:{LONG}|after=2",
    "features": f"features:{LONG}|after=3",
}
OBJECTS = [{"phrase": "a cat", "box": [1.0, 2.0, 30.5, 40.25], "score": 0.9, "misalignment": 0.3}]


def _result(p_fake: float = 0.8, **overrides) -> dict:
    result = {
        "image_sha256": "a" * 64,
        "p_fake": p_fake,
        "verdict": "fake" if p_fake >= 0.5 else "real",
        "threshold": 0.5,
        "caption": "a cat on a mat",
        "objects": OBJECTS,
        "object_count": len(OBJECTS),
        "timings_ms": {"caption": 12.5},
    }
    return {**result, **overrides}


def _register(ledger: Ledger, *versions: PipelineVersion) -> None:
    with ledger.session() as session:
        for version in versions or (VERSION,):
            ledger.ensure_pipeline_version(session, version, "tiny")


def _create(ledger: Ledger, external_id: str, version: PipelineVersion = VERSION) -> CheckRow:
    with ledger.session() as session:
        check, _ = ledger.create_check(
            session, external_id=external_id, pipeline_version_id=version.id, source={"url": f"https://x/{external_id}"}
        )
    return check


def _get(ledger: Ledger, check_id: str) -> CheckRow:
    with ledger.session() as session:
        return ledger.get_check(session, check_id)


def _age(ledger: Ledger, check_id: str, by: timedelta) -> None:
    with ledger.session() as session:
        session.execute(sa.update(CheckRow).where(CheckRow.id == check_id).values(updated_at=datetime.now(UTC) - by))


def _artifacts(n: int, dim: int = 8) -> Artifacts:
    objects = [GroundedObject(f"thing {i}", (i + 0.5, 2.25, 30.0 + i, 40.125), 0.5 + i / 100) for i in range(n)]
    return Artifacts(
        caption="a photo of things" if n else "",
        objects=objects,
        embeddings=Embeddings(torch.randn(dim), torch.randn(dim), torch.randn(n, dim), torch.randn(n, dim)),
        features=Features(torch.randn(dim), torch.randn(n, dim)),
    )


def _assert_same(loaded: Artifacts, saved: Artifacts) -> None:
    assert loaded.caption == saved.caption
    assert loaded.objects == saved.objects
    for name in ("image", "text", "object_images", "object_texts"):
        assert torch.equal(getattr(loaded.embeddings, name), getattr(saved.embeddings, name)), name
    assert torch.equal(loaded.features.global_, saved.features.global_)
    assert torch.equal(loaded.features.objects, saved.features.objects)


# ---------------------------------------------------------------------- pipeline versions and checks


def test_ensure_pipeline_version_is_idempotent(ledger):
    _register(ledger)
    _register(ledger)
    with ledger.session() as session:
        assert session.scalar(sa.text("SELECT count(*) FROM pipeline_versions")) == 1
        assert session.scalar(sa.text("SELECT ground FROM pipeline_versions")) == "gdino:b"


def test_create_check_is_idempotent(ledger):
    _register(ledger, VERSION, OTHER_VERSION)
    with ledger.session() as session:
        first, created = ledger.create_check(
            session, external_id="post-1", pipeline_version_id=VERSION.id, source={"blob": "b" * 64}
        )
        assert created
        again, created_again = ledger.create_check(
            session, external_id="post-1", pipeline_version_id=VERSION.id, source={"url": "https://other"}
        )
    assert not created_again
    assert again.id == first.id
    assert again.source == {"blob": "b" * 64}  # the first submission's source stays
    assert first.status == CheckStatus.queued and first.attempts == 0
    assert first.created_at.tzinfo is not None and first.enqueued_at is not None
    assert _create(ledger, "post-1", OTHER_VERSION).id != first.id  # another version is another check
    with ledger.session() as session:
        assert ledger.find_check(session, "post-1", VERSION.id).id == first.id
        assert ledger.find_check(session, "post-2", VERSION.id) is None
        assert ledger.get_check(session, "no-such-id") is None


def test_concurrent_create_check_makes_one_row(ledger, database_url):
    """Separate engines (as separate processes would have) race on one key: one row, one `created`."""
    _register(ledger)
    racers = [Ledger(database_url) for _ in range(6)]
    barrier = threading.Barrier(len(racers))
    outcomes: list[tuple[str, bool]] = []

    def race(racer: Ledger) -> None:
        barrier.wait()
        with racer.session() as session:
            check, created = racer.create_check(
                session, external_id="racy", pipeline_version_id=VERSION.id, source={"url": "https://x/racy"}
            )
        outcomes.append((check.id, created))

    threads = [threading.Thread(target=race, args=(racer,)) for racer in racers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    for racer in racers:
        racer.dispose()
    assert len(outcomes) == len(racers)
    assert len({check_id for check_id, _ in outcomes}) == 1
    assert sum(created for _, created in outcomes) == 1
    with ledger.session() as session:
        assert session.scalar(sa.select(sa.func.count()).select_from(CheckRow)) == 1


def test_create_check_waits_for_an_uncommitted_insert(ledger, database_url):
    """The second insert blocks on the first transaction, then finds its row instead of making another."""
    _register(ledger)
    inserted, second = threading.Event(), Ledger(database_url)
    results: dict[str, tuple[str, bool]] = {}

    def later() -> None:
        inserted.wait()
        with second.session() as session:
            check, created = second.create_check(
                session, external_id="slow", pipeline_version_id=VERSION.id, source={"url": "https://x/2"}
            )
        results["second"] = (check.id, created)

    thread = threading.Thread(target=later)
    thread.start()
    with ledger.session() as session:
        check, created = ledger.create_check(
            session, external_id="slow", pipeline_version_id=VERSION.id, source={"url": "https://x/1"}
        )
        inserted.set()
        thread.join(timeout=0.5)  # the other transaction cannot finish while this one holds the row
        assert thread.is_alive()
    thread.join(timeout=30)
    second.dispose()
    assert created
    assert results["second"] == (check.id, False)


def test_create_check_refuses_an_overlong_external_id(ledger):
    _register(ledger)
    with pytest.raises(ValueError, match="limit is 512"), ledger.session() as session:
        ledger.create_check(session, external_id="e" * 513, pipeline_version_id=VERSION.id, source={})


def test_create_check_needs_a_registered_version(ledger):
    with pytest.raises(sa.exc.IntegrityError), ledger.session() as session:
        ledger.create_check(session, external_id="orphan", pipeline_version_id="pv-unknown", source={})


# ---------------------------------------------------------------------- status changes


def _claim(ledger: Ledger, session, limit: int = 1, seconds: float = 60, max_attempts: int = 5) -> tuple:
    """Claims the `limit` oldest ready checks of VERSION under a new lease; returns (lease, rows)."""
    lease = Lease.new("test:1", seconds)
    rows = ledger.claim(session, pipeline_version_id=VERSION.id, limit=limit, lease=lease, max_attempts=max_attempts)
    return lease, rows


def _expire(ledger: Ledger, check_id: str) -> None:
    with ledger.session() as session:
        past = datetime.now(UTC) - timedelta(seconds=1)
        session.execute(sa.update(CheckRow).where(CheckRow.id == check_id).values(lease_expires_at=past))


def test_claim_takes_the_oldest_ready_checks_under_a_lease(ledger):
    _register(ledger)
    checks = [_create(ledger, f"run-{i}") for i in range(3)]
    with ledger.session() as session:
        lease, rows = _claim(ledger, session, limit=2)
        assert [row.id for row in rows] == [checks[0].id, checks[1].id]
        assert all(row.status == CheckStatus.running and row.attempts == 1 for row in rows)
        assert all(row.lease_token == lease.token and row.lease_owner == "test:1" for row in rows)
        assert all(row.lease_expires_at > datetime.now(UTC) + timedelta(seconds=50) for row in rows)
        assert [row.id for row in _claim(ledger, session, limit=5)[1]] == [checks[2].id]  # held ones are not ready
        assert _claim(ledger, session)[1] == []


def test_an_expired_lease_is_claimed_again_and_its_old_holder_changes_nothing(ledger):
    _register(ledger)
    check = _create(ledger, "lease-1")
    with ledger.session() as session:
        old, _ = _claim(ledger, session)
    _expire(ledger, check.id)  # its worker died (or stalled past its lease)
    with ledger.session() as session:
        new, [taken] = _claim(ledger, session)
        assert taken.attempts == 2 and taken.lease_token == new.token
        assert ledger.finish_done(session, check.id, old.token, **_result(0.1)) is None
        assert ledger.mark_queued(session, check.id, old.token, available_at=datetime.now(UTC)) is None
        assert ledger.finish_failed(session, check.id, "late.failure", "too late", old.token) is None
        assert ledger.finish_done(session, check.id, new.token, **_result(0.8))
    after = _get(ledger, check.id)
    assert (after.status, after.p_fake, after.lease_expires_at) == (CheckStatus.done, 0.8, None)


def test_renewing_keeps_the_lease_and_counts_what_it_holds(ledger):
    _register(ledger)
    checks = [_create(ledger, f"renew-{i}") for i in range(2)]
    with ledger.session() as session:
        lease, rows = _claim(ledger, session, limit=2, seconds=1)
        ledger.finish_done(session, checks[0].id, lease.token, **_result())
    with ledger.session() as session:
        assert ledger.renew(session, replace(lease, seconds=120)) == 1  # the done one is no longer held
    assert _get(ledger, checks[1].id).lease_expires_at > datetime.now(UTC) + timedelta(seconds=100)


def test_attempts_used_up_are_left_for_the_reconciler(ledger):
    _register(ledger)
    check = _create(ledger, "poison-1")
    with ledger.session() as session:
        _claim(ledger, session, max_attempts=1)
    _expire(ledger, check.id)  # its worker died on it
    with ledger.session() as session:
        assert _claim(ledger, session, max_attempts=1)[1] == []  # never claimed again
        assert [row.id for row in ledger.abandoned_checks(session, max_attempts=1)] == [check.id]
        assert ledger.abandoned_checks(session, max_attempts=2) == []
        failed = ledger.fail_abandoned(session, check.id, 1, "check.stuck", "no worker finished it")
    assert (failed.status, failed.error_code) == (CheckStatus.failed, "check.stuck")


def test_a_retry_is_not_claimed_before_its_time_and_keeps_the_last_error(ledger):
    _register(ledger)
    check = _create(ledger, "retry-1")
    with ledger.session() as session:
        lease, _ = _claim(ledger, session)
        later = datetime.now(UTC) + timedelta(hours=1)
        queued = ledger.mark_queued(
            session, check.id, lease.token, available_at=later, error_code="url.timeout", error_message="slow server"
        )
        assert queued.status == CheckStatus.queued and queued.error_code == "url.timeout"
        assert _claim(ledger, session)[1] == []  # its backoff has not passed
    with ledger.session() as session:
        session.execute(sa.update(CheckRow).where(CheckRow.id == check.id).values(available_at=datetime.now(UTC)))
    with ledger.session() as session:
        lease, [again] = _claim(ledger, session)
        kept = ledger.mark_queued(session, check.id, lease.token, available_at=datetime.now(UTC))  # no new error
    assert (kept.error_code, kept.error_message, kept.attempts) == ("url.timeout", "slow server", 2)
    assert kept.enqueued_at >= check.enqueued_at


def test_finish_done_twice_keeps_the_first_result(ledger):
    _register(ledger)
    check = _create(ledger, "done-1")
    with ledger.session() as session:
        lease, _ = _claim(ledger, session)
        ledger.mark_queued(
            session, check.id, lease.token, available_at=datetime.now(UTC), error_code="gpu.out_of_memory",
            error_message="oom",
        )  # fmt: skip
        lease, _ = _claim(ledger, session)
        assert ledger.finish_done(session, check.id, lease.token, **_result(0.8))
    with ledger.session() as session:
        assert not ledger.finish_done(session, check.id, lease.token, **_result(0.1, caption="another caption"))
        assert not ledger.finish_failed(session, check.id, "late.failure", "too late", lease.token)
    done = _get(ledger, check.id)
    assert (done.status, done.p_fake, done.verdict, done.caption) == (CheckStatus.done, 0.8, "fake", "a cat on a mat")
    assert (done.objects, done.object_count, done.timings_ms) == (OBJECTS, 1, {"caption": 12.5})
    assert (done.error_code, done.error_message) == (None, None)
    assert done.finished_at is not None and done.finished_at.tzinfo is not None


def test_rejected_and_failed_keep_their_codes(ledger):
    _register(ledger)
    failed, rejected = _create(ledger, "bad-2"), _create(ledger, "bad-1")
    with ledger.session() as session:
        lease, _ = _claim(ledger, session)  # `failed`, the older
        assert ledger.finish_rejected(session, rejected.id, "image.not_an_image", "a PDF document")  # at intake
        assert ledger.finish_failed(session, failed.id, "fetch.timeout", "gave up after 5 attempts", lease.token)
        assert not ledger.finish_rejected(session, failed.id, "other", "other", lease.token)
        assert not ledger.finish_rejected(session, failed.id, "other", "other")  # claimed once: not the intake's
        assert not ledger.finish_done(session, rejected.id, lease.token, **_result())
    rows = {row.id: row for row in (_get(ledger, rejected.id), _get(ledger, failed.id))}
    assert (rows[rejected.id].status, rows[rejected.id].error_code) == (CheckStatus.rejected, "image.not_an_image")
    assert rows[rejected.id].error_message == "a PDF document" and rows[rejected.id].p_fake is None
    assert (rows[failed.id].status, rows[failed.id].error_code) == (CheckStatus.failed, "fetch.timeout")


def test_stuck_checks_are_old_queued_or_running_ones(ledger):
    _register(ledger)
    old_running, old_queued, fresh, old_done = (_create(ledger, f"stuck-{i}") for i in range(4))
    with ledger.session() as session:
        _claim(ledger, session)  # old_running, the oldest
        ledger.finish_rejected(session, old_done.id, "image.empty", "empty")
    for check in (old_queued, old_running, old_done):
        _age(ledger, check.id, timedelta(hours=1))
    with ledger.session() as session:
        stuck = ledger.stuck_checks(session, timedelta(minutes=15))
        assert len(ledger.stuck_checks(session, timedelta(minutes=15), limit=1)) == 1
        assert ledger.stuck_checks(session, timedelta(hours=2)) == []
    assert {check.id for check in stuck} == {old_queued.id, old_running.id}
    assert fresh.id not in {check.id for check in stuck}


# ---------------------------------------------------------------------- reading checks


def test_list_checks_filters_newest_first(ledger):
    _register(ledger)
    checks = [_create(ledger, f"list-{i}") for i in range(4)]
    with ledger.session() as session:
        lease, _ = _claim(ledger, session, limit=2)
        ledger.finish_done(session, checks[0].id, lease.token, **_result(0.9))
        ledger.finish_done(session, checks[1].id, lease.token, **_result(0.1))
        ledger.finish_rejected(session, checks[2].id, "image.empty", "empty")
        everything = ledger.list_checks(session)
        done = ledger.list_checks(session, status="done")
        fake = ledger.list_checks(session, verdict="fake")
        real_done = ledger.list_checks(session, status=CheckStatus.done, verdict="real")
        since_second = ledger.list_checks(session, since=checks[1].created_at)
        until_second = ledger.list_checks(session, until=checks[1].created_at)
        two = ledger.list_checks(session, limit=2)
        with pytest.raises(ValueError):
            ledger.list_checks(session, status="lost")
    assert [c.id for c in everything] == [c.id for c in reversed(checks)]
    assert [c.id for c in done] == [checks[1].id, checks[0].id]
    assert [c.id for c in fake] == [checks[0].id]
    assert [c.id for c in real_done] == [checks[1].id]
    assert [c.id for c in since_second] == [c.id for c in reversed(checks[1:])]
    assert [c.id for c in until_second] == [checks[0].id]
    assert [c.id for c in two] == [checks[3].id, checks[2].id]


def test_count_by_status(ledger):
    _register(ledger)
    checks = [_create(ledger, f"count-{i}") for i in range(5)]
    with ledger.session() as session:
        assert ledger.count_by_status(session) == {"queued": 5, "running": 0, "done": 0, "rejected": 0, "failed": 0}
        lease, _ = _claim(ledger, session, limit=3)
        ledger.finish_done(session, checks[1].id, lease.token, **_result())
        ledger.finish_failed(session, checks[2].id, "x", "y", lease.token)
        counts = ledger.count_by_status(session)
    assert counts == {"queued": 2, "running": 1, "done": 1, "rejected": 0, "failed": 1}


def test_done_checks_for_images_answers_duplicates(ledger):
    _register(ledger, VERSION, OTHER_VERSION)
    image = decoded(1)
    first, second = _create(ledger, "dup-1"), _create(ledger, "dup-2")
    other_version = _create(ledger, "dup-3", OTHER_VERSION)
    with ledger.session() as session:
        assert ledger.done_checks_for_images(session, [image.sha256], VERSION.id) == {}
        ledger.upsert_images(session, [image])
        lease, _ = _claim(ledger, session, limit=2)  # running, not done: not an answer yet
        other = Lease.new("test:2", 60)
        ledger.claim(session, pipeline_version_id=OTHER_VERSION.id, limit=1, lease=other, max_attempts=5)
        ledger.finish_done(session, other_version.id, other.token, **_result(image_sha256=image.sha256))
        assert ledger.done_checks_for_images(session, [image.sha256], VERSION.id) == {}
        ledger.finish_done(session, first.id, lease.token, **_result(0.7, image_sha256=image.sha256))
        ledger.finish_done(session, second.id, lease.token, **_result(0.2, image_sha256=image.sha256))
        answers = ledger.done_checks_for_images(session, [image.sha256, "f" * 64, image.sha256], VERSION.id)
    assert list(answers) == [image.sha256]  # bytes never checked have no answer
    assert answers[image.sha256].id == first.id and answers[image.sha256].p_fake == 0.7


# ---------------------------------------------------------------------- images, blobs, artifacts


def test_images_and_blobs_are_written_once(ledger):
    image = decoded(2, width=40, height=30)
    with ledger.session() as session:
        ledger.upsert_images(session, [image])
        ledger.upsert_images(session, [image])
        ledger.put_blob(session, "c" * 64, b"\x00original bytes\xff")
        ledger.put_blob(session, "c" * 64, b"\x00original bytes\xff")
        row = session.execute(sa.text("SELECT n_bytes, width, height, format FROM images")).one()
        blobs = ledger.get_blobs(session, ["c" * 64, "d" * 64])
        assert blobs.get("c" * 64) == b"\x00original bytes\xff"
        assert blobs.get("d" * 64) is None
    assert tuple(row) == (image.n_bytes, 40, 30, "PNG")


@pytest.mark.parametrize("n", [3, 0])
def test_artifacts_round_trip_exactly(ledger, n):
    saved = _artifacts(n)
    with ledger.session() as session:
        ledger.save_artifacts(session, "e" * 64, saved, KEYS)
        ledger.save_artifacts(session, "e" * 64, saved, KEYS)  # a redelivered batch: no error, no change
    with ledger.session() as session:
        loaded = ledger.load_artifacts(session, ["e" * 64, "f" * 64], KEYS)
        rows = session.scalar(sa.text("SELECT count(*) FROM artifacts"))
    assert rows == 4
    _assert_same(loaded["e" * 64], saved)
    assert loaded["f" * 64] == Artifacts()
    assert loaded["e" * 64].embeddings.object_images.shape == (n, 8)
    assert loaded["e" * 64].features.objects.dtype == torch.float32


def test_saving_again_keeps_the_first_artifacts(ledger):
    first, second = _artifacts(2), _artifacts(2)
    with ledger.session() as session:
        ledger.save_artifacts(session, "e" * 64, first, KEYS)
    with ledger.session() as session:
        ledger.save_artifacts(session, "e" * 64, second, KEYS)
    with ledger.session() as session:
        _assert_same(ledger.load_artifacts(session, ["e" * 64], KEYS)["e" * 64], first)


def test_artifacts_are_keyed_by_their_exact_version(ledger):
    with ledger.session() as session:
        ledger.save_artifacts(session, "e" * 64, _artifacts(1), KEYS)
        other_keys = {kind: f"{key}!" for kind, key in KEYS.items()}
        assert ledger.load_artifacts(session, ["e" * 64], other_keys) == {"e" * 64: Artifacts()}
        partly = ledger.load_artifacts(session, ["e" * 64], {**other_keys, "caption": KEYS["caption"]})
        assert ledger.load_artifacts(session, [], KEYS) == {}
    assert partly["e" * 64].caption == "a photo of things"
    assert (partly["e" * 64].objects, partly["e" * 64].embeddings, partly["e" * 64].features) == (None, None, None)


def test_only_present_artifacts_are_saved(ledger):
    partial = Artifacts(caption="just a caption", objects=[])
    with ledger.session() as session:
        ledger.save_artifacts(session, "e" * 64, partial, KEYS)
        loaded = ledger.load_artifacts(session, ["e" * 64], KEYS)["e" * 64]
    assert loaded == partial


def test_a_failed_session_writes_nothing(ledger):
    _register(ledger)
    with pytest.raises(RuntimeError), ledger.session() as session:
        ledger.create_check(session, external_id="rolled-back", pipeline_version_id=VERSION.id, source={})
        raise RuntimeError("boom")
    with ledger.session() as session:
        assert ledger.find_check(session, "rolled-back", VERSION.id) is None
