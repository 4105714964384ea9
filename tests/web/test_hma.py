"""The HMA / python-threatexchange classifier against the real `threatexchange` package: through the HTTP API of
a running `item serve`, and in-process."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import encode, noise_image, random_head
from worker.ledger import migrate
from worker.web.keys import create_key

classifier = pytest.importorskip("threatexchange.classifier.classifier")  # the `hma` extra
from threatexchange.content_type.photo import PhotoContent  # noqa: E402
from threatexchange.content_type.text import TextContent  # noqa: E402

from worker.hma import LABEL, UNCERTAIN_LABEL, ItemClassifier  # noqa: E402


def test_it_is_a_threatexchange_classifier_of_photos():
    assert issubclass(ItemClassifier, classifier.Classifier)
    assert ItemClassifier.get_content_types() == [PhotoContent]
    with pytest.raises(ValueError, match="photos"):
        ItemClassifier("http://127.0.0.1:1", "k").classify(TextContent, "hello")


def test_hma_asks_a_running_service_and_gets_the_verdict_it_stored(served, server, tmp_path):
    base, _ = server
    key = create_key(served.ledger, "hma", ["submit", "read"]).key
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(noise_image(9, 96, 72)))
    asking = ItemClassifier(base, key, timeout_s=60)
    result = _while_a_worker_runs(served, lambda: asking.classify(PhotoContent, str(photo)))
    info = result.labels[LABEL]
    with served.ledger.session() as session:
        check = served.ledger.get_check(session, info.check_id)
    assert (check.status, check.p_fake, check.verdict) == ("done", info.p_fake, info.verdict)
    assert info.verdict_reason == check.verdict_reason == "score" and info.generator is None
    assert info.is_match == (check.verdict == "fake") and not result.labels[UNCERTAIN_LABEL].is_match
    assert check.external_id.startswith("hma:sha256:")
    # the same photo again is the same check (idempotent on its bytes), answered without a model run
    again = asking.classify(PhotoContent, str(photo))
    assert again.labels[LABEL].check_id == info.check_id


def test_a_refused_photo_is_an_error_with_its_code(served, server, tmp_path):
    base, _ = server
    key = create_key(served.ledger, "hma", ["submit", "read"]).key
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not an image at all")
    asking = ItemClassifier(base, key, timeout_s=60)
    with pytest.raises(Exception) as refused:
        _while_a_worker_runs(served, lambda: asking.classify(PhotoContent, str(junk)))
    assert getattr(refused.value, "code", None) == "image.unsupported_format"
    with pytest.raises(Exception) as unauthorised:
        ItemClassifier(base, "item_k000000000000_" + "A" * 43).classify(PhotoContent, str(junk))
    assert unauthorised.value.code == "auth.unknown"


def test_without_a_service_it_runs_the_detector_here(tiny_store, tmp_path, monkeypatch):
    from pipeline.core.detector import Detector
    from pipeline.core.profiles import get_profile

    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    head = random_head(detector, threshold=0.999, threshold_low=0.0).save(tmp_path / "head")  # all unsure
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    migrate.upgrade(url)
    settings = {"PROFILE": "tiny", "MODEL_DIR": str(tiny_store.model_dir), "HEAD": str(head), "DATABASE_URL": url}
    for name, value in {**settings, "DEVICE": "cpu", "ALLOW_DOWNLOAD": "false"}.items():
        monkeypatch.setenv(f"ITEM_{name}", value)
    monkeypatch.delenv("ITEM_HMA_API_URL", raising=False)
    photo = tmp_path / "photo.png"
    photo.write_bytes(encode(noise_image(4, 96, 72)))
    result = ItemClassifier.get_with_default_settings().classify(PhotoContent, str(photo))
    assert result.labels[UNCERTAIN_LABEL].is_match and not result.labels[LABEL].is_match
    assert result.labels[LABEL].verdict == "uncertain" and 0 <= result.labels[LABEL].p_fake < 0.999


def _while_a_worker_runs(served, ask):
    """`ask()` on a thread while the worker code runs the checks it files, here."""
    with ThreadPoolExecutor(1) as pool:
        future = pool.submit(ask)
        deadline = time.monotonic() + 90
        while not future.done() and time.monotonic() < deadline:
            served.run_checks()
            time.sleep(0.1)
        return future.result(timeout=5)
