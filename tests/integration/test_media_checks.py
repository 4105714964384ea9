"""Videos, animations, near-copies and the bank through the check service, on a real ledger (both databases).

The tiny detector runs for real on the CPU; its stages are counted, so "a re-score decoded nothing and ran only the
head" and "a near-copy ran no model" are proved by what ran."""

from __future__ import annotations

import io
from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa
from PIL import Image

from pipeline.core.detector import Detector
from pipeline.core.profiles import get_profile
from tests import media_files
from tests.conftest import count_stage_images, encode, random_head
from tests.unit.test_pdq import jpeg, natural_image, resized, screenshot
from worker import rescore
from worker.gpu.batches import CheckService
from worker.gpu.embedded import InProcess
from worker.ledger import review_queue, reviews, tenants
from worker.ledger.models import utcnow
from worker.ledger.near_rows import NearHashRow
from worker.ledger.retention import Policy, maintain
from worker.ledger.store import RescoreSelection
from worker.settings import Settings


def runner(ledger, tiny_store, folder, seed: int = 0, **settings) -> InProcess:
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    detector.use_head(random_head(detector, seed=seed))
    base = {"batch_size": 8, "batch_max_wait_s": 0, "allowed_path_roots": [folder], "database_url": "sqlite://"}
    config = Settings(**(base | settings))
    return InProcess(config, CheckService(config, ledger, detector))


def check(run: InProcess, folder, name: str, data: bytes, tenant: str = "default"):
    path = folder / name
    path.write_bytes(data)
    filed = run.submit([_request(name, path)], tenant)[0]
    run.finish([filed.check.id])
    with run.service.ledger.session() as session:
        return run.service.ledger.checks_by_id(session, [filed.check.id])[0]


def _request(name, path):
    from worker.intake.filing import CheckRequest

    return CheckRequest(f"upload-{name}", {"path": str(path)})


def as_png(image: Image.Image) -> bytes:
    return encode(image, "PNG")


def as_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


# ---------------------------------------------------------------------- videos and animations


def test_a_video_is_scored_frame_by_frame_and_aggregated(ledger, tiny_store, tmp_path):
    run = runner(ledger, tiny_store, tmp_path, video_frames=4, video_flag_frames=2)
    calls = count_stage_images(run.service.detector)
    row = check(run, tmp_path, "clip.mp4", media_files.video_bytes("mp4", frames=20, fps=10, size=(64, 48)))
    assert row.status == "done", (row.error_code, row.error_message)
    media = row.media
    assert media["kind"] == "video" and media["format"] == "MP4" and media["frame_rule"] == "even-v1:n=4"
    assert [frame["index"] for frame in media["frames"]] == [0, 1, 2, 3]
    assert [frame["time_s"] for frame in media["frames"]] == pytest.approx([0.0, 0.5, 1.0, 1.5])
    assert calls["caption"] == 4  # each frame ran once, as one batch
    # the check's p(fake) is its second-highest frame's
    scores = sorted((frame["p_fake"] for frame in media["frames"]), reverse=True)
    assert row.p_fake == pytest.approx(scores[1], abs=1e-6)
    assert media["aggregation"] == {
        "rule": "kth_highest",
        "k": 2,
        "flagged": sum(f["verdict"] == "fake" for f in media["frames"]),
        "frames": 4,
    }
    with run.service.ledger.session() as session:
        thumbs = [reviews.get_thumbnail(session, frame["sha256"]) for frame in media["frames"]]
        image = run.service.ledger.get_image(session, row.image_sha256)
    assert all(thumb is not None for thumb in thumbs)  # the console's strip has every frame
    assert image.format == "MP4" and [f["sha256"] for f in image.media["frames"]] == [
        f["sha256"] for f in media["frames"]
    ]


def test_a_head_upgrade_rescores_a_video_without_decoding_it(ledger, tiny_store, tmp_path):
    old = runner(ledger, tiny_store, tmp_path, video_frames=3)
    first = check(old, tmp_path, "clip.webm", media_files.video_bytes("webm", frames=12, fps=6))
    assert first.status == "done"
    (tmp_path / "clip.webm").unlink()  # gone: a re-score that needed its bytes would be rejected
    new = runner(ledger, tiny_store, tmp_path, seed=7, video_frames=3)
    calls = count_stage_images(new.service.detector)
    run = rescore.queue(
        ledger, RescoreSelection(), version_id=new.service.version_id, on_page=lambda _run, ids: new.finish(ids)
    )
    run = rescore.refresh(ledger, run)
    assert run.counts()["done"] == 1
    assert calls == Counter()  # the frames' features were stored: only the head ran
    with ledger.session() as session:
        [again] = [r for r in ledger.list_checks(session, pipeline_version_id=new.service.version_id)]
    assert [f["sha256"] for f in again.media["frames"]] == [f["sha256"] for f in first.media["frames"]]


@pytest.mark.parametrize("maker", [media_files.animated_gif, media_files.animated_webp, media_files.apng])
def test_an_animation_is_sampled(ledger, tiny_store, tmp_path, maker):
    run = runner(ledger, tiny_store, tmp_path, video_frames=3)
    row = check(run, tmp_path, "moving.img", maker(durations=(100,) * 9, size=(48, 40)))
    assert row.status == "done" and row.media["kind"] == "animation" and len(row.media["frames"]) == 3


def test_with_no_frames_an_animation_is_judged_by_its_first_frame_as_before(ledger, tiny_store, tmp_path):
    run = runner(ledger, tiny_store, tmp_path, video_frames=0)
    gif = check(run, tmp_path, "moving.gif", media_files.animated_gif(size=(48, 40)))
    assert gif.status == "done" and gif.media is None
    clip = check(run, tmp_path, "clip.mp4", media_files.video_bytes("mp4"))
    assert clip.status == "rejected" and clip.error_code == "image.unsupported_format"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (media_files.audio_only(), "video.no_video_stream"),
        (media_files.huge_duration_webm(), "video.too_long"),
        (media_files.garbage_after_ftyp(), None),  # some video.* code, never a crash or a hang
    ],
)
def test_a_hostile_container_ends_rejected_with_a_stable_code(ledger, tiny_store, tmp_path, data, code):
    run = runner(ledger, tiny_store, tmp_path, video_frames=4)
    row = check(run, tmp_path, "bad.bin", data)
    assert row.status == "rejected"
    assert row.error_code == code if code else row.error_code.startswith("video.")


def test_a_still_image_has_no_media(ledger, tiny_store, tmp_path):
    run = runner(ledger, tiny_store, tmp_path)
    row = check(run, tmp_path, "still.png", as_png(natural_image(1)))
    assert row.status == "done" and row.media is None and row.reused_from is None and row.match is None


# ---------------------------------------------------------------------- near-copies and the bank


def test_near_copies_are_answered_from_the_judged_image(ledger, tiny_store, tmp_path):
    run = runner(ledger, tiny_store, tmp_path)
    original = natural_image(3)
    first = check(run, tmp_path, "original.png", as_png(original))
    assert first.status == "done" and first.reused_from is None
    calls = count_stage_images(run.service.detector)
    copies = {
        "q40.jpg": as_jpeg(original, 40),
        "half.jpg": as_jpeg(resized(original, 0.5)),
        "screenshot.png": as_png(screenshot(original, 0.1, (255, 255, 255))),
        "rerender.jpg": as_jpeg(jpeg(resized(original, 1.5), 70)),
    }
    for name, data in copies.items():
        row = check(run, tmp_path, name, data)
        assert row.status == "done" and row.reused_from is not None, name
        assert row.reused_from["check_id"] == first.id and 0 <= row.reused_from["distance"] <= 16, name
        assert row.p_fake == first.p_fake and row.image_sha256 != first.image_sha256
    assert calls == Counter()  # no model ran for any copy
    other = check(run, tmp_path, "other.png", as_png(natural_image(4)))
    assert other.reused_from is None and calls["caption"] == 1


def test_near_copies_stay_within_a_tenant_and_can_be_turned_off(ledger, tiny_store, tmp_path):
    with ledger.session() as session:
        tenants.create_tenant(session, "acme")
    run = runner(ledger, tiny_store, tmp_path)
    original = natural_image(5)
    check(run, tmp_path, "original.png", as_png(original))
    theirs = check(run, tmp_path, "theirs.jpg", as_jpeg(original, 60), tenant="acme")
    assert theirs.status == "done" and theirs.reused_from is None  # another tenant's check never answers
    off = runner(ledger, tiny_store, tmp_path, near_duplicates=False)
    mine = check(off, tmp_path, "mine.jpg", as_jpeg(original, 60))
    assert mine.reused_from is None


def _decide(ledger, check_id: str, label: str, tenant: str = "default") -> None:
    with ledger.session() as session:
        reviews.record_decision(session, check_id, label, "moderator", None, tenant_id=tenant)


def test_the_bank_flags_near_copies_of_what_a_moderator_marked(ledger, tiny_store, tmp_path):
    run = runner(ledger, tiny_store, tmp_path, near_duplicates=False)  # the bank alone
    original = natural_image(6)
    first = check(run, tmp_path, "original.png", as_png(original))
    _decide(ledger, first.id, "ai_generated")
    copy = check(run, tmp_path, "copy.jpg", as_jpeg(resized(original, 0.75), 50))
    assert copy.verdict == "fake" and copy.verdict_reason == "match"
    assert copy.match["label"] == "fake" and copy.match["check_id"] == first.id
    assert copy.match["decision_id"] and copy.match["distance"] <= 16
    with ledger.session() as session:
        assert review_queue.get_item(session, copy.id) is None  # decided already: not queued for moderators again

    _decide(ledger, first.id, "authentic")  # the moderator changed their mind: the latest decision counts
    again = check(run, tmp_path, "again.jpg", as_jpeg(original, 45))
    assert again.verdict == "real" and again.verdict_reason == "match" and again.match["label"] == "real"

    _decide(ledger, first.id, "unsure")  # out of the bank
    later = check(run, tmp_path, "later.jpg", as_jpeg(original, 55))
    assert later.match is None and later.verdict_reason != "match"


def test_an_exact_copy_from_another_tenant_carries_none_of_the_first_tenants_matches(ledger, tiny_store, tmp_path):
    with ledger.session() as session:
        tenants.create_tenant(session, "acme")
    run = runner(ledger, tiny_store, tmp_path)
    original = as_png(natural_image(8))
    first = check(run, tmp_path, "original.png", original)
    _decide(ledger, first.id, "ai_generated")
    mine = check(run, tmp_path, "mine.png", original)  # the same bytes, the same tenant: the bank flags it
    assert mine.match is not None and mine.verdict == "fake"
    theirs = check(run, tmp_path, "theirs.png", original, tenant="acme")
    assert theirs.status == "done" and theirs.match is None and theirs.reused_from is None
    assert theirs.p_fake == first.p_fake and theirs.verdict_reason != "match"


def test_maintenance_deletes_near_copy_entries_past_the_checks_retention(ledger, tiny_store, tmp_path):
    run = runner(ledger, tiny_store, tmp_path)
    young = check(run, tmp_path, "young.png", as_png(natural_image(10)))
    old = check(run, tmp_path, "old.png", as_png(natural_image(11)))
    with ledger.session() as session:
        aged = utcnow() - timedelta(days=91)
        session.execute(sa.update(NearHashRow).where(NearHashRow.check_id == old.id).values(created_at=aged))
    policy = Policy.from_settings(Settings(database_url="sqlite://", retain_checks_days=90))
    assert maintain(ledger.engine, policy, progress=lambda _line: None).near_hashes_deleted == 1
    with ledger.session() as session:
        assert list(session.scalars(sa.select(NearHashRow.check_id))) == [young.id]
