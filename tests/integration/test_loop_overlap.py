"""The worker's loop overlaps batches: the next one is claimed and prepared while the models run this one, and a
stopping worker gives back what it prepared but will not run (real ledger on both databases, real tiny models)."""

from __future__ import annotations

import threading
import time

from pipeline.core.detector import Detector
from pipeline.core.profiles import get_profile
from tests.conftest import encode, noise_image, random_head
from worker.gpu.batches import CheckService
from worker.gpu.loop import Loop
from worker.intake.filing import CheckRequest, Intake
from worker.ledger.states import CheckStatus
from worker.settings import Settings


class HeldModels(Detector):
    """The real tiny detector, which waits for `go` before each batch and records when each batch ran."""

    go: threading.Event
    running: threading.Event
    ran: list[tuple[float, float]]

    def detect(self, images, known=None, prepared=None):
        self.running.set()
        started = time.monotonic()
        self.go.wait(30)
        results = super().detect(images, known, prepared)
        self.ran.append((started, time.monotonic()))
        return results


def _service(ledger, tiny_store, tmp_path) -> CheckService:
    detector = HeldModels(get_profile("tiny"), tiny_store, device="cpu")
    detector.go, detector.running, detector.ran = threading.Event(), threading.Event(), []
    detector.use_head(random_head(detector))
    settings = Settings(batch_size=2, batch_max_wait_s=0, idle_poll_s=0.1, allowed_path_roots=[tmp_path])
    service = CheckService(settings, ledger, detector)
    service.register_version(activate=True)
    return service


def _file(service: CheckService, tmp_path, seeds: range) -> list[str]:
    requests = []
    for seed in seeds:
        path = tmp_path / f"{seed}.png"
        path.write_bytes(encode(noise_image(seed)))
        requests.append(CheckRequest(f"overlap-{seed}", {"path": str(path)}))
    return [one.check.id for one in Intake(service.settings, service.ledger).file(requests)]


def _checks(service: CheckService, ids: list[str]) -> list:
    with service.ledger.session() as session:
        return service.ledger.checks_by_id(session, ids)


def _wait_until(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_the_next_batch_is_claimed_and_prepared_while_the_models_run(ledger, tiny_store, tmp_path):
    service = _service(ledger, tiny_store, tmp_path)
    ids = _file(service, tmp_path, range(100, 104))  # two batches of two
    loop = Loop(service)
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        service.detector.running.wait(30)  # the models hold the first batch...
        _wait_until(lambda: sum(c.status == CheckStatus.running for c in _checks(service, ids)) == 4)
        service.detector.go.set()  # ...and the second was claimed meanwhile; now let both run
        _wait_until(lambda: {c.status for c in _checks(service, ids)} == {CheckStatus.done})
    finally:
        loop.stop.set()
        service.detector.go.set()
        thread.join(30)
    assert not thread.is_alive()
    assert len(service.detector.ran) == 2
    assert all(check.attempts == 1 for check in _checks(service, ids))


def test_a_stopping_loop_gives_back_the_batch_it_prepared(ledger, tiny_store, tmp_path):
    service = _service(ledger, tiny_store, tmp_path)
    ids = _file(service, tmp_path, range(200, 204))
    loop = Loop(service)
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        service.detector.running.wait(30)
        _wait_until(lambda: sum(c.status == CheckStatus.running for c in _checks(service, ids)) == 4)
        loop.stop.set()  # a SIGTERM: the batch in the models finishes, the prefetched one is not run
        service.detector.go.set()
        thread.join(30)
    finally:
        loop.stop.set()
        service.detector.go.set()
    assert not thread.is_alive()
    checks = _checks(service, ids)
    assert sorted(c.status for c in checks) == [CheckStatus.done] * 2 + [CheckStatus.queued] * 2
    given_back = [c for c in checks if c.status == CheckStatus.queued]
    assert all(c.attempts == 0 and c.lease_expires_at is None for c in given_back)  # claimable now, attempt unused
    assert len(service.detector.ran) == 1
