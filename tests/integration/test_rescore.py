"""Re-scoring in-process on a real ledger (both databases): what is reused, what runs, what is counted.

The stages of the upgraded detector are instrumented (their calls counted, and whether their model was ever
loaded), so "nothing but the head ran" is proved by what ran, not by how long it took.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.core.detector import Detector
from pipeline.core.head import Head
from pipeline.core.profiles import get_profile
from tests.conftest import count_stage_images, encode, noise_image, random_head
from worker import rescore
from worker.gpu.batches import CheckService
from worker.gpu.embedded import InProcess
from worker.ledger.states import CheckStatus, Priority
from worker.ledger.store import Lease, RescoreSelection
from worker.settings import Settings

N = 6


class Harness:
    """A worker of one version, in-process: checks it is given are filed and run here, to their end."""

    def __init__(self, ledger, detector: Detector, folder):
        settings = Settings(batch_size=4, batch_max_wait_s=0, allowed_path_roots=[folder], database_url="sqlite://")
        self.runner = InProcess(settings, CheckService(settings, ledger, detector))
        self.service = self.runner.service

    def run(self, run: rescore.RescoreRun, waiting: list[str]) -> None:
        """`rescore.queue`'s page hook: what the page left waiting runs now."""
        self.runner.finish(waiting)


@pytest.fixture
def checked(ledger, tiny_detector, tmp_path):
    """N images checked under the session's tiny detector (the old version); returns their ledger rows."""
    old = Harness(ledger, tiny_detector, tmp_path)
    for seed in range(N):
        path = tmp_path / f"{seed}.png"
        path.write_bytes(encode(noise_image(seed, 64 + 8 * seed, 72)))
        old.runner.receive(f"post-{seed}", {"path": str(path)})
    with ledger.session() as session:
        rows = ledger.list_checks(session, status="done")
    assert len(rows) == N
    return rows


def _upgraded(ledger, tiny_store, folder, profile: str = "tiny", **head_overrides) -> tuple[Harness, Counter]:
    detector = Detector(get_profile(profile), tiny_store, device="cpu")
    detector.use_head(random_head(detector, seed=7, **head_overrides))
    calls = count_stage_images(detector)
    return Harness(ledger, detector, folder), calls


def _rescore_all(ledger, harness: Harness) -> rescore.RescoreRun:
    run = rescore.queue(ledger, RescoreSelection(), version_id=harness.service.version_id, on_page=harness.run)
    return rescore.refresh(ledger, run)


def _rescores(ledger, version_id: str) -> list:
    """The re-score checks under `version_id` (a run keeps counts, not their ids)."""
    with ledger.session() as session:
        rows = ledger.list_checks(session, pipeline_version_id=version_id, limit=1000)
    return [row for row in rows if row.priority == Priority.rescore]


def test_a_head_only_upgrade_runs_only_the_head(ledger, tiny_store, checked, tmp_path):
    for path in tmp_path.glob("*.png"):
        path.unlink()  # the images are gone: a re-score that needed pixels would be rejected
    new, calls = _upgraded(ledger, tiny_store, tmp_path)
    run = _rescore_all(ledger, new)

    assert run.counts()["done"] == N and run.created == N
    assert calls == Counter()  # no caption, grounding or CLIP call
    detector = new.service.detector
    assert not detector.captioner.loaded and not detector.grounder.loaded  # (CLIP was loaded to build the head)
    # Each new score is the new head applied to the stored features, computed here independently.
    rows = _rescores(ledger, new.service.version_id)
    assert len(rows) == N
    with ledger.session() as session:
        stored = ledger.load_artifacts(session, [r.image_sha256 for r in rows], detector.artifact_versions)
    for row in rows:
        expected = detector.head.predict(detector.representation(stored[row.image_sha256].features)[None])[0]
        assert row.p_fake == pytest.approx(float(expected), abs=1e-6)
        assert row.priority == Priority.rescore and row.rescore_of in {c.id for c in checked}
        assert row.timings_ms["caption"] == row.timings_ms["ground"] == row.timings_ms["embed"] == 0.0


def test_the_old_results_stay_readable_under_their_version(ledger, tiny_store, checked, tmp_path):
    new, _ = _upgraded(ledger, tiny_store, tmp_path)
    _rescore_all(ledger, new)
    with ledger.session() as session:
        for before in checked:
            old = ledger.find_check(session, before.external_id, before.pipeline_version_id)
            assert (old.status, old.p_fake, old.verdict) == ("done", before.p_fake, before.verdict)
            assert ledger.find_check(session, before.external_id, new.service.version_id).status == "done"


def test_a_clip_upgrade_keeps_captions_and_boxes(ledger, tiny_store, checked, tmp_path):
    new, calls = _upgraded(ledger, tiny_store, tmp_path, profile="tiny+embed=tiny-clip-quickgelu-alt")
    run = _rescore_all(ledger, new)

    assert run.counts()["done"] == N
    assert calls["caption"] == calls["ground"] == 0
    assert calls["embed"] >= N  # every whole image (and its crops) through the new CLIP
    detector = new.service.detector
    assert not detector.captioner.loaded and not detector.grounder.loaded
    by_id = {c.external_id: c for c in checked}
    for row in _rescores(ledger, new.service.version_id):
        before = by_id[row.external_id]
        assert row.caption == before.caption
        assert [o["box"] for o in row.objects] == [o["box"] for o in before.objects]


def test_a_second_rescore_does_nothing(ledger, tiny_store, checked, tmp_path):
    new, calls = _upgraded(ledger, tiny_store, tmp_path, profile="tiny+embed=tiny-clip-quickgelu-alt")
    _rescore_all(ledger, new)
    embedded = calls["embed"]
    again = _rescore_all(ledger, new)
    assert (again.selected, again.created, again.already_done) == (N, 0, N)
    assert calls["embed"] == embedded and again.queued == 0


def test_an_interrupted_rescore_resumes(ledger, tiny_store, checked, tmp_path):
    new, _ = _upgraded(ledger, tiny_store, tmp_path)
    version = new.service.version_id
    first = rescore.queue(ledger, RescoreSelection(), version_id=version, limit=4)  # interrupted before running
    assert first.created == 4 and rescore.refresh(ledger, first).counts()["queued"] == 4
    second = _rescore_all(ledger, new)
    assert (second.selected, second.created, second.queued) == (N, N - 4, N)  # the 4 still queued are run too
    assert second.counts()["done"] == N


def test_flipped_verdicts_are_counted(ledger, tiny_store, tiny_detector, checked, tmp_path):
    # The same weights with another threshold: scores stay, so which verdicts flip is known beforehand.
    scores = sorted(c.p_fake for c in checked)
    threshold = (scores[N // 2 - 1] + scores[N // 2]) / 2
    head = tiny_detector.head
    moved = Head(head.module, replace(head.metadata, threshold=threshold))
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    detector.use_head(moved)
    new = Harness(ledger, detector, tmp_path)
    run = _rescore_all(ledger, new)

    after = {c.external_id: ("fake" if c.p_fake >= threshold else "real") for c in checked}
    to_fake = sum(c.verdict == "real" and after[c.external_id] == "fake" for c in checked)
    to_real = sum(c.verdict == "fake" and after[c.external_id] == "real" for c in checked)
    flips = rescore.flips(ledger, run)
    assert to_fake + to_real > 0
    assert (flips.to_fake, flips.to_real, flips.compared) == (to_fake, to_real, N)


def test_the_selection_filters(ledger, tiny_store, checked, tmp_path):
    new, _ = _upgraded(ledger, tiny_store, tmp_path)
    version = new.service.version_id
    fakes = [c for c in checked if c.verdict == "fake"]
    scores = sorted(c.p_fake for c in checked)
    assert rescore.count(ledger, RescoreSelection(verdict="fake"), version_id=version) == len(fakes)
    band = RescoreSelection(min_score=scores[1], max_score=scores[3])
    assert rescore.count(ledger, band, version_id=version) == 3
    ids = RescoreSelection(external_ids=("post-1", "post-4", "post-unknown"))
    assert rescore.count(ledger, ids, version_id=version) == 2
    old_version = checked[0].pipeline_version_id
    assert rescore.count(ledger, RescoreSelection(from_version=old_version), version_id=version) == N
    assert rescore.count(ledger, RescoreSelection(from_version="pv-other"), version_id=version) == 0
    assert rescore.count(ledger, RescoreSelection(), version_id=version, limit=4) == 4
    assert rescore.count(ledger, RescoreSelection(), version_id=old_version) == 0  # nothing older than itself


def test_fresh_checks_are_claimed_before_rescores(ledger, tiny_store, checked, tmp_path):
    new, _ = _upgraded(ledger, tiny_store, tmp_path)
    rescore.queue(ledger, RescoreSelection(), version_id=new.service.version_id)  # N re-scores wait
    waiting = {row.id for row in _rescores(ledger, new.service.version_id)}
    path = tmp_path / "fresh.png"
    path.write_bytes(encode(noise_image(99)))
    with ledger.session() as session:
        fresh, _ = ledger.create_check(
            session, external_id="fresh", pipeline_version_id=new.service.version_id, source={"path": str(path)}
        )
    lease = Lease.new("test:1", 60)
    batch = new.service.claim_batch(lease)  # filed after every re-score...
    assert [c.id for c in batch] == [fresh.id]  # ...and still what gets claimed first
    new.service.run_batch(batch, lease)
    rest = new.service.claim_batch(Lease.new("test:1", 60))
    assert {c.id for c in rest} == waiting  # then the re-scores, in one batch of up to 64
    assert all(c.priority == Priority.rescore for c in rest)
    with ledger.session() as session:
        assert ledger.get_check(session, fresh.id).status == CheckStatus.done


def test_a_long_rescore_backlog_is_not_stuck_but_a_dead_workers_rescore_is(ledger, tiny_store, checked, tmp_path):
    import sqlalchemy as sa

    from worker.ledger.models import CheckRow

    new, _ = _upgraded(ledger, tiny_store, tmp_path)
    rescore.queue(ledger, RescoreSelection(), version_id=new.service.version_id)
    waiting, dead = [row.id for row in _rescores(ledger, new.service.version_id)][:2]
    with ledger.session() as session:
        old = datetime.now(UTC) - timedelta(hours=2)
        session.execute(sa.update(CheckRow).where(CheckRow.rescore_of.is_not(None)).values(updated_at=old))
        session.execute(sa.update(CheckRow).where(CheckRow.id == dead).values(status="running", updated_at=old))
        stuck = {row.id for row in ledger.stuck_checks(session, timedelta(hours=1))}
        counts = ledger.count_stuck(session, timedelta(hours=1))
    assert waiting not in stuck and dead in stuck  # queued behind fresh uploads is normal; running that long is not
    assert counts == {"queued": 0, "running": 1}
