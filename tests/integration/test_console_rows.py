"""What the worker keeps for the console, on both ledgers: a thumbnail of each image it decoded (whatever the
source), its heartbeat while its loop runs, and the reconciler's purge of what outlived its retention."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa
from PIL import Image
from sqlalchemy.exc import OperationalError

from tests.conftest import encode, noise_image
from tests.integration.stack import serve_images
from worker.gpu import loop as worker_loop
from worker.gpu import reading as service_module  # where a batch makes its thumbnails
from worker.gpu.batches import CheckService
from worker.gpu.loop import Loop
from worker.intake.filing import CheckRequest, Intake
from worker.ledger import access, callback_secrets, reviews
from worker.ledger.models import CheckRow, ConsoleSessionRow, ThumbnailRow, WorkerRow, utcnow
from worker.ledger.reviews import Thumbnail
from worker.ledger.states import CheckStatus
from worker.ledger.store import Lease
from worker.ops.reconciler import reconcile
from worker.settings import Settings

ITEM = Path(sys.executable).parent / "item"
MAX_SIDE = 64


def _service(ledger, detector, tmp_path, **overrides) -> CheckService:
    values = {
        "batch_size": 16, "batch_max_wait_s": 0, "idle_poll_s": 0.1, "allowed_path_roots": [tmp_path],
        "fetch_allowed_networks": ["127.0.0.1/32"], "thumbnail_max_side": MAX_SIDE, "database_url": "sqlite://",
    }  # fmt: skip
    service = CheckService(Settings(**{**values, **overrides}), ledger, detector)
    service.register_version(activate=True)
    return service


def _run_one_batch(service: CheckService) -> int:
    lease = Lease.new("test:1", 60)
    checks = service.claim_batch(lease)
    service.run_batch(checks, lease)
    return len(checks)


def _thumbnails(ledger) -> dict[str, ThumbnailRow]:
    with ledger.session() as session:
        return {row.sha256: row for row in session.scalars(sa.select(ThumbnailRow))}


def _statuses(ledger) -> dict[str, str]:
    with ledger.session() as session:
        return {row.external_id: row.status for row in session.scalars(sa.select(CheckRow))}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---------------------------------------------------------------------- thumbnails


def test_a_batch_stores_one_thumbnail_per_distinct_image_of_every_source(ledger, tiny_detector, tmp_path):
    service = _service(ledger, tiny_detector, tmp_path)
    inline, on_disk, on_web = (encode(noise_image(seed, 200, 120)) for seed in (1, 2, 3))
    small = encode(noise_image(4, 40, 30))  # within the thumbnail size: kept at its own
    (tmp_path / "disk.png").write_bytes(on_disk)
    with serve_images({"web.png": on_web}) as base:
        requests = [
            CheckRequest("inline", {"b64": base64.b64encode(inline).decode()}),
            CheckRequest("inline-again", {"b64": base64.b64encode(inline).decode()}),  # the same bytes
            CheckRequest("disk", {"path": str(tmp_path / "disk.png")}),
            CheckRequest("web", {"url": f"{base}/web.png"}),
            CheckRequest("small", {"b64": base64.b64encode(small).decode()}),
            CheckRequest("junk", {"b64": base64.b64encode(b"not an image").decode()}),
        ]
        Intake(service.settings, ledger).file(requests)
        assert _run_one_batch(service) == len(requests)

    statuses = _statuses(ledger)
    assert statuses.pop("junk") == CheckStatus.rejected
    assert set(statuses.values()) == {CheckStatus.done}, statuses
    uploads = {"inline": inline, "disk": on_disk, "web": on_web, "small": small}
    thumbnails = _thumbnails(ledger)
    assert set(thumbnails) == {_sha(data) for data in uploads.values()}  # nothing for the junk, once for the copy
    for name, data in uploads.items():
        row, original = thumbnails[_sha(data)], Image.open(io.BytesIO(data))
        shown = Image.open(io.BytesIO(row.data))
        assert shown.format == "JPEG" and shown.size == (row.width, row.height), name
        assert max(shown.size) == min(MAX_SIDE, max(original.size)), name  # at most MAX_SIDE, never upscaled
        assert abs(shown.width / shown.height - original.width / original.height) < 0.05, name


def test_a_second_batch_of_the_same_bytes_keeps_the_first_thumbnail(ledger, tiny_detector, tmp_path):
    service = _service(ledger, tiny_detector, tmp_path)
    data = base64.b64encode(encode(noise_image(5))).decode()
    Intake(service.settings, ledger).file([CheckRequest("first", {"b64": data})])
    _run_one_batch(service)
    first = _thumbnails(ledger)
    Intake(service.settings, ledger).file([CheckRequest("second", {"b64": data})])
    _run_one_batch(service)
    again = _thumbnails(ledger)
    assert set(again) == set(first) and len(first) == 1
    [(sha, row)] = again.items()
    assert row.created_at == first[sha].created_at  # kept, not rewritten: retention counts from the first


def test_no_thumbnails_are_kept_when_their_size_is_zero(ledger, tiny_detector, tmp_path):
    service = _service(ledger, tiny_detector, tmp_path, thumbnail_max_side=0)
    data = base64.b64encode(encode(noise_image(6))).decode()
    Intake(service.settings, ledger).file([CheckRequest("one", {"b64": data})])
    _run_one_batch(service)
    assert _statuses(ledger) == {"one": CheckStatus.done}
    assert _thumbnails(ledger) == {}


def test_a_thumbnail_that_cannot_be_made_never_fails_its_check(ledger, tiny_detector, tmp_path, monkeypatch):
    service = _service(ledger, tiny_detector, tmp_path)
    broken, fine = noise_image(7), noise_image(8)
    make = service_module.thumbnail_jpeg

    def thumbnail_jpeg(image, max_side):
        if image.tobytes() == broken.tobytes():
            raise OSError("the encoder broke")
        return make(image, max_side)

    monkeypatch.setattr(service_module, "thumbnail_jpeg", thumbnail_jpeg)
    requests = [
        CheckRequest(name, {"b64": base64.b64encode(encode(image)).decode()})
        for name, image in (("broken", broken), ("fine", fine))
    ]
    Intake(service.settings, ledger).file(requests)
    _run_one_batch(service)
    assert _statuses(ledger) == {"broken": CheckStatus.done, "fine": CheckStatus.done}
    assert set(_thumbnails(ledger)) == {_sha(encode(fine))}


# ---------------------------------------------------------------------- heartbeats


def _workers(ledger) -> dict[str, WorkerRow]:
    with ledger.session() as session:
        return {row.owner: row for row in session.scalars(sa.select(WorkerRow))}


def _wait_until(condition, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while not (found := condition()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return found


def _running(loop: Loop) -> threading.Thread:
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    return thread


def _stopped(loop: Loop, thread: threading.Thread) -> None:
    loop.stop.set()
    thread.join(30)
    assert not thread.is_alive()


def test_a_running_loop_beats_and_its_row_goes_when_it_stops(ledger, tiny_detector, tmp_path, monkeypatch):
    monkeypatch.setattr(worker_loop, "HEARTBEAT_S", 0.2)
    service = _service(ledger, tiny_detector, tmp_path)
    loop = Loop(service)
    thread = _running(loop)
    try:
        first = _wait_until(lambda: _workers(ledger).get(loop.owner))  # the first beat, at once
        assert first.pipeline_version_id == service.version_id
        later = _wait_until(lambda: (row := _workers(ledger).get(loop.owner)) and row.seen_at > first.seen_at and row)
        assert later.started_at == first.started_at  # the same run of the loop, seen again
        assert list(_workers(ledger)) == [loop.owner]
    finally:
        _stopped(loop, thread)
    assert _workers(ledger) == {}


def test_the_heartbeat_outlives_a_ledger_outage(ledger, tiny_detector, tmp_path, monkeypatch):
    monkeypatch.setattr(worker_loop, "HEARTBEAT_S", 0.05)
    beat, calls = reviews.heartbeat, []

    def flaky_heartbeat(session, *args):
        calls.append(time.monotonic())
        if len(calls) <= 3:
            raise OperationalError("INSERT", {}, ConnectionError("the ledger went away"))
        beat(session, *args)

    monkeypatch.setattr(reviews, "heartbeat", flaky_heartbeat)
    loop = Loop(_service(ledger, tiny_detector, tmp_path))
    thread = _running(loop)
    try:
        _wait_until(lambda: loop.owner in _workers(ledger))
        assert len(calls) > 3  # it failed three times and went on beating
    finally:
        _stopped(loop, thread)
    assert _workers(ledger) == {}


# ---------------------------------------------------------------------- retention


def _age(ledger, model, column, sha_or_token: str, by: timedelta) -> None:
    key = model.__table__.primary_key.columns.values()[0]
    with ledger.session() as session:
        session.execute(sa.update(model).where(key == sha_or_token).values({column: utcnow() - by}))


def _old_and_new_rows(ledger, retention: timedelta) -> None:
    """Two thumbnails, one past `retention`; two console sessions of a key, one expired."""
    with ledger.session() as session:
        reviews.put_thumbnails(session, [Thumbnail(name * 64, b"\xff\xd8\xff", 1, 1) for name in ("a", "b")])
        access.add_key(session, "k000000000001", "moderator", ["console"], "0" * 64, "default")
        access.add_session(session, "1" * 64, "k000000000001", "csrf-1", timedelta(hours=1))
        access.add_session(session, "2" * 64, "k000000000001", "csrf-2", timedelta(hours=1))
    _age(ledger, ThumbnailRow, "created_at", "a" * 64, retention + timedelta(hours=1))
    _age(ledger, ConsoleSessionRow, "expires_at", "2" * 64, timedelta(seconds=1))


def test_the_reconciler_deletes_old_thumbnails_and_expired_sessions(ledger):
    settings = Settings(thumbnail_retention_days=2, database_url="sqlite://")
    _old_and_new_rows(ledger, timedelta(days=2))
    result = reconcile(settings, ledger)
    assert (result.thumbnails_purged, result.sessions_purged) == (1, 1)
    assert set(_thumbnails(ledger)) == {"b" * 64}
    with ledger.session() as session:
        assert list(session.scalars(sa.select(ConsoleSessionRow.token_sha256))) == ["1" * 64]
    again = reconcile(settings, ledger)
    assert (again.thumbnails_purged, again.sessions_purged) == (0, 0)  # counts of what went, not of what is


def test_the_reconciler_deletes_callback_secrets_whose_rotation_window_ended(ledger):
    with ledger.session() as session:
        old = callback_secrets.create_secret(session, "default")
        new = callback_secrets.rotate_secret(session, "default", window_s=0)  # the old one signs no more
        assert {row.key_id for row in callback_secrets.list_secrets(session, "default")} == {old.key_id, new.key_id}
    reconcile(Settings(database_url="sqlite://"), ledger)
    with ledger.session() as session:
        assert [row.key_id for row in callback_secrets.list_secrets(session, "default")] == [new.key_id]


def test_item_reconcile_json_reports_the_purge(ledger, database_url, tiny_store):
    _old_and_new_rows(ledger, timedelta(days=30))
    env = {**os.environ, "ITEM_DATABASE_URL": database_url, "ITEM_MODEL_DIR": str(tiny_store.model_dir)}
    env["ITEM_THUMBNAIL_RETENTION_DAYS"] = "30"
    result = subprocess.run([str(ITEM), "reconcile", "--json"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["failed"] == 0 and (report["thumbnails_purged"], report["sessions_purged"]) == (1, 1)
    assert set(_thumbnails(ledger)) == {"b" * 64}
