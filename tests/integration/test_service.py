"""The check service in-process on a real ledger (both databases): reuse, duplicates, memory pressure."""

from __future__ import annotations

import time

import pytest
import torch

from pipeline.core.detector import Detector
from pipeline.core.profiles import get_profile
from tests.conftest import encode, noise_image, random_head
from worker.gpu.batches import CheckService, TransientError
from worker.gpu.embedded import InProcess
from worker.intake.filing import CheckRequest
from worker.ledger.store import Lease
from worker.settings import Settings


class SmallGpu(Detector):
    """The real tiny detector on a pretend GPU that runs out of memory above `capacity` images per batch.

    Out-of-memory cannot happen on this machine's CPU, so it is injected here; everything else is real.
    """

    capacity = 2
    batches: list[int]

    def detect(self, images, known=None, prepared=None):
        self.batches.append(len(images))
        if len(images) > self.capacity:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().detect(images, known, prepared)


@pytest.fixture
def service(ledger, tiny_store, tmp_path):
    detector = SmallGpu(get_profile("tiny"), tiny_store, device="cpu")
    detector.batches = []
    detector.use_head(random_head(detector))
    settings = Settings(batch_size=8, batch_max_wait_s=0, allowed_path_roots=[tmp_path], database_url="sqlite://")
    return InProcess(settings, CheckService(settings, ledger, detector)).service


def receive(service: CheckService, external_id: str, image: dict) -> None:
    """One check submitted and run to its end here, as the embedded mode runs it."""
    InProcess(service.settings, service).receive(external_id, image)


def _submit(service: CheckService, folder, seeds: list[int]) -> list[str]:
    ids = []
    for seed in seeds:
        path = folder / f"{seed}.png"
        path.write_bytes(encode(noise_image(seed)))
        receive(service, f"ext-{seed}", {"path": str(path)})
        with service.ledger.session() as session:
            ids.append(service.ledger.find_check(session, f"ext-{seed}", service.version_id).id)
    return ids


def test_out_of_memory_halves_the_batch_and_everything_finishes(service, tmp_path):
    # given eight checks waiting, claimed as one batch
    with service.ledger.session() as session:
        for seed in range(8):
            (tmp_path / f"{seed}.png").write_bytes(encode(noise_image(seed)))
            service.ledger.create_check(
                session,
                external_id=f"ext-{seed}",
                pipeline_version_id=service.version_id,
                source={"path": str(tmp_path / f"{seed}.png")},
            )
    # when a worker claims them
    with service.ledger.session() as session:
        waiting = [row.id for row in service.ledger.list_checks(session)]
    InProcess(service.settings, service).finish(waiting)
    # then the batch of 8 was split until it fit, and all eight are done
    assert service.detector.batches == [8, 4, 2, 2, 4, 2, 2]  # 8 fails, each half fails, each quarter fits
    assert sum(n for n in service.detector.batches if n <= SmallGpu.capacity) == 8
    with service.ledger.session() as session:
        rows = [service.ledger.find_check(session, f"ext-{seed}", service.version_id) for seed in range(8)]
    assert {row.status for row in rows} == {"done"}


def test_stored_artifacts_are_reused_for_new_checks_of_the_same_bytes(service, tmp_path):
    first = _submit(service, tmp_path, [1])
    calls = len(service.detector.batches)
    path = tmp_path / "copy.png"
    path.write_bytes((tmp_path / "1.png").read_bytes())
    receive(service, "ext-copy", {"path": str(path)})
    assert len(service.detector.batches) == calls  # answered from the ledger: no model run at all
    with service.ledger.session() as session:
        copy = service.ledger.find_check(session, "ext-copy", service.version_id)
        original = service.ledger.get_check(session, first[0])
    assert copy.status == "done" and copy.p_fake == original.p_fake and copy.timings_ms == {"reused": 0.0}


def test_a_malformed_message_still_gets_a_terminal_ledger_row(service):
    receive(service, "ext-bad", {"url": "http://a/", "b64": "AAAA"})
    with service.ledger.session() as session:
        row = service.ledger.find_check(session, "ext-bad", service.version_id)
    assert row.status == "rejected" and row.error_code == "source.invalid"


def test_a_malformed_message_never_rejects_an_earlier_valid_check(service, tmp_path):
    with service.ledger.session() as session:
        check, _ = service.ledger.create_check(
            session, external_id="ext-shared", pipeline_version_id=service.version_id, source={"url": "http://a/"}
        )
    InProcess(service.settings, service).intake.file([CheckRequest("ext-shared", {"url": "http://a/", "path": "/x"})])
    with service.ledger.session() as session:
        assert service.ledger.get_check(session, check.id).status == "queued"


class CrashingModel(SmallGpu):
    def detect(self, images, known=None, prepared=None):
        raise RuntimeError("model kernel crashed")


def test_a_crashing_model_is_retried_then_failed(ledger, tiny_store, tmp_path):
    detector = CrashingModel(get_profile("tiny"), tiny_store, device="cpu")
    detector.use_head(random_head(detector))
    settings = Settings(
        max_attempts=2, retry_backoff_s=0.1, batch_max_wait_s=0, allowed_path_roots=[tmp_path], database_url="sqlite://"
    )
    runner = InProcess(settings, CheckService(settings, ledger, detector))
    (tmp_path / "a.png").write_bytes(encode(noise_image(3)))
    [filed] = runner.intake.file([CheckRequest("ext-crash", {"path": str(tmp_path / "a.png")})])
    lease = Lease.new("test:1", 60)
    runner.service.run_batch(runner.service.claim_batch(lease), lease)
    with ledger.session() as session:
        row = ledger.get_check(session, filed.check.id)
    assert row.status == "queued" and row.error_code == "check.internal_error" and row.available_at > row.updated_at
    runner.finish([row.id])  # the retry, once its backoff has passed
    with ledger.session() as session:
        row = ledger.get_check(session, row.id)
    assert row.status == "failed" and row.attempts == 2 and "model kernel crashed" in row.error_message


class SlowModel(SmallGpu):
    seen_after: list  # the check's status as the models return, long past the budget

    def detect(self, images, known=None, prepared=None):
        time.sleep(3)  # stands for a model stage running long (huge inputs, a contended GPU)
        with self.ledger.session() as session:
            self.seen_after.append(self.ledger.get_check(session, self.check_id).status)
        return super().detect(images, known, prepared)


def test_a_batch_past_its_budget_inside_the_models_ends_as_check_timeout(ledger, tiny_store, tmp_path):
    detector = SlowModel(get_profile("tiny"), tiny_store, device="cpu")
    detector.batches, detector.seen_after, detector.ledger = [], [], ledger
    detector.use_head(random_head(detector))
    settings = Settings(
        batch_time_budget_s=0.5,
        max_attempts=1,
        batch_max_wait_s=0,
        allowed_path_roots=[tmp_path],
        database_url="sqlite://",
    )
    runner = InProcess(settings, CheckService(settings, ledger, detector))
    (tmp_path / "slow.png").write_bytes(encode(noise_image(5)))
    [filed] = runner.intake.file([CheckRequest("ext-slow", {"path": str(tmp_path / "slow.png")})])
    detector.check_id = filed.check.id
    assert runner.loop.run_once() == 1
    with ledger.session() as session:
        row = ledger.get_check(session, filed.check.id)
    assert (row.status, row.error_code) == ("failed", "check.timeout"), (row.status, row.error_code)
    # Nothing was raised into the models: they ran to their end, and the watchdog had recorded the timeout at the
    # deadline, while they still ran (the embedded mode never ends its process); what they made was dropped.
    assert detector.seen_after == ["failed"]
    assert row.p_fake is None


class PoisonedGpu(SmallGpu):
    def detect(self, images, known=None, prepared=None):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")  # as PyTorch raises it


def test_a_cuda_error_in_the_embedded_mode_retries_the_batch_and_ends_the_command(ledger, tiny_store, tmp_path):
    detector = PoisonedGpu(get_profile("tiny"), tiny_store, device="cpu")
    detector.use_head(random_head(detector))
    settings = Settings(batch_max_wait_s=0, allowed_path_roots=[tmp_path], database_url="sqlite://")
    runner = InProcess(settings, CheckService(settings, ledger, detector))
    (tmp_path / "a.png").write_bytes(encode(noise_image(4)))
    [filed] = runner.intake.file([CheckRequest("ext-poisoned", {"path": str(tmp_path / "a.png")})])
    # the device is unusable for this process: no other check may run on it, so the command ends with the error
    with pytest.raises(TransientError) as raised:
        runner.loop.run_once()
    assert raised.value.code == "gpu.fault" and "illegal memory access" in raised.value.message
    with ledger.session() as session:
        row = ledger.get_check(session, filed.check.id)
    assert (row.status, row.error_code, row.attempts) == ("queued", "gpu.fault", 1)  # retried, by a fresh process


def test_a_server_whose_answer_holds_nul_rejects_its_check_with_the_reason_kept_escaped(ledger, tiny_store):
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)

    def answer() -> None:  # a hostile image host: NUL and a lone byte in the status line and the body
        with listener:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(b"HTTP/1.1 404 Not\x00Found\xff\r\nContent-Length: 9\r\n\r\nno\x00such\x00")

    threading.Thread(target=answer, daemon=True).start()
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    detector.use_head(random_head(detector))
    settings = Settings(batch_max_wait_s=0, database_url="sqlite://", fetch_allowed_networks=["127.0.0.1/32"])
    service = InProcess(settings, CheckService(settings, ledger, detector)).service
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/x.png"
    receive(service, "hostile-host", {"url": url})
    with service.ledger.session() as session:
        row = service.ledger.find_check(session, "hostile-host", service.version_id)
    assert (row.status, row.error_code) == ("rejected", "url.http_4xx")
    assert "\x00" not in row.error_message and "Not\\x00Found" in row.error_message
