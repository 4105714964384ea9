"""The models' host work of a batch prepared ahead (ITEM_PREPARE_AHEAD): on the prefetch phase when it is on, on
the model thread when it is off, the same stored results either way, parts of it for the halves of a batch that ran
out of memory; the simulated device's busy time reported per batch; and the feed benchmark's embedded smoke run
(real ledger on both databases, real tiny models)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pipeline.core import simulated
from pipeline.core.detector import Detector, untrained_head
from pipeline.core.imaging import decode_image
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from tests.conftest import encode, noise_image, random_head
from worker.gpu.batches import Batch, CheckService
from worker.intake.filing import CheckRequest, Intake
from worker.ledger.states import CheckStatus
from worker.ledger.store import Lease
from worker.ops import metrics
from worker.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


class Recorded(Detector):
    """The real detector, recording in which phase it prepared inputs (itself or a stage on its own) and what each
    `detect` was handed; on a pretend GPU that runs out of memory above `capacity` images when one is set."""

    phase = "setup"
    capacity: int | None = None
    prepared_in: list[str]
    calls: list[tuple[int, object]]

    def prepare(self, images, known=None):
        self.prepared_in.append(self.phase)
        return super().prepare(images, known)

    def detect(self, images, known=None, prepared=None):
        self.calls.append((len(images), prepared))
        if self.capacity is not None and len(images) > self.capacity:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super().detect(images, known, prepared)


def _detector(profile: str, store: ModelStore, head=random_head, capacity: int | None = None) -> Recorded:
    detector = Recorded(get_profile(profile), store, device="cpu")
    detector.prepared_in, detector.calls, detector.capacity = [], [], capacity
    detector.use_head(head(detector))
    stage_phases = detector.stage_prepared_in = []
    for stage in (detector.captioner, detector.grounder, detector.embedder):

        def recording(images, _method=stage.prepare, _name=stage.name):
            stage_phases.append((_name, detector.phase))
            return _method(images)

        stage.prepare = recording
    return detector


def _service(ledger, detector: Detector, tmp_path, prepare_ahead: bool) -> CheckService:
    settings = Settings(
        batch_size=8, batch_max_wait_s=0, allowed_path_roots=[tmp_path], prepare_ahead=prepare_ahead,
        database_url="sqlite://",
    )  # fmt: skip
    service = CheckService(settings, ledger, detector)
    service.register_version(activate=True)
    return service


def _png(seed: int) -> bytes:
    return encode(noise_image(seed, 80 + 8 * seed, 64))


def _file(service: CheckService, tmp_path, seeds: list[int]) -> None:
    """A check per seed, its image a PNG of that seed's noise (a seed twice: the same bytes twice)."""
    requests = []
    for index, seed in enumerate(seeds):
        path = tmp_path / f"{seed}.png"
        path.write_bytes(_png(seed))
        requests.append(CheckRequest(f"ahead-{index}", {"path": str(path)}))
    Intake(service.settings, service.ledger).file(requests)


def _run_batch(service: CheckService, expected: int) -> Batch:
    """One batch through the three phases, here in order (the loop runs them on three threads)."""
    lease = Lease.new("test:1", 60)
    checks = service.claim_batch(lease)
    assert len(checks) == expected
    batch = Batch(checks, lease, time.monotonic() + 120)
    service.detector.phase = "prefetch"
    service.prepare(batch)
    batch.prepared_ahead = batch.prepared  # run_models lets go of it (pinned buffers are freed before the store)
    service.detector.phase = "models"
    service.run_models(batch)
    assert batch.prepared is None
    service.detector.phase = "store"
    service.store(batch)
    return batch


def _stored(service: CheckService) -> dict[str, object]:
    with service.ledger.session() as session:
        return {row.external_id: row for row in service.ledger.list_checks(session)}


SEEDS = [1, 2, 3, 2, 4]  # five checks, four distinct images


@pytest.fixture(scope="module")
def reference(tiny_store) -> dict[str, float]:
    """Each check's p_fake as the tiny detector scores its decoded bytes alone, without a worker."""
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    detector.use_head(random_head(detector))
    detections = detector.detect([decode_image(_png(seed)) for seed in SEEDS])
    return {f"ahead-{index}": d.p_fake for index, d in enumerate(detections)}


def _unique_in_batch_order(batch: Batch) -> list[str]:
    """The sha256 of each distinct image the models run, in the order of the batch's checks."""
    return list(dict.fromkeys(batch.images[check.id].sha256 for check in batch.todo))


@pytest.mark.parametrize("ahead", [True, False], ids=["ahead", "on-the-model-thread"])
def test_inputs_are_prepared_where_the_setting_says_with_the_same_results(
    ledger, tiny_store, reference, tmp_path, ahead
):
    detector = _detector("tiny", tiny_store)
    service = _service(ledger, detector, tmp_path, prepare_ahead=ahead)
    _file(service, tmp_path, SEEDS)
    batch = _run_batch(service, expected=len(SEEDS))
    unique = _unique_in_batch_order(batch)
    assert len(unique) == 4 and set(unique) == {decode_image(_png(seed)).sha256 for seed in SEEDS}
    [(images, handed)] = detector.calls  # one model call for the batch, each image once
    assert images == 4
    if ahead:
        assert batch.prepared_ahead is not None and handed is batch.prepared_ahead and batch.prepared_for == unique
        assert len(batch.prepared_ahead.staged) == 4 and batch.prepare_ms > 0
        assert detector.prepared_in == ["prefetch"]
        assert {phase for _, phase in detector.stage_prepared_in} == {"prefetch"}  # no stage prepared again
    else:
        assert batch.prepared_ahead is None and handed is None and batch.prepare_ms == 0.0
        assert detector.prepared_in == ["models"]  # the model thread prepared them, within detect
        assert {phase for _, phase in detector.stage_prepared_in} == {"models"}
    rows = _stored(service)
    assert {row.status for row in rows.values()} == {CheckStatus.done}
    assert {key: row.p_fake for key, row in rows.items()} == pytest.approx(reference, abs=1e-6)
    assert rows["ahead-1"].p_fake == rows["ahead-3"].p_fake  # the same bytes: one run, one answer
    assert all(row.timings_ms["prepare"] >= 0 for row in rows.values())


def test_a_batch_halved_for_memory_detects_each_half_on_its_part_of_the_prepared_inputs(
    ledger, tiny_store, reference, tmp_path
):
    detector = _detector("tiny", tiny_store, capacity=2)
    service = _service(ledger, detector, tmp_path, prepare_ahead=True)
    _file(service, tmp_path, SEEDS)
    batch = _run_batch(service, expected=len(SEEDS))
    assert batch.prepared_for == _unique_in_batch_order(batch)
    assert [images for images, _ in detector.calls] == [4, 2, 2]  # out of memory at 4: two halves
    whole, first, second = (handed for _, handed in detector.calls)
    assert whole is batch.prepared_ahead
    for part, start in ((first, 0), (second, 2)):
        assert part is not None and part is not batch.prepared_ahead
        assert part.staged == batch.prepared_ahead.staged[start : start + 2]
        assert all(inputs.rows == [0, 1] for inputs in part.inputs.values())
    assert detector.prepared_in == ["prefetch"]
    assert {phase for _, phase in detector.stage_prepared_in} == {"prefetch"}  # the halves prepared nothing
    rows = _stored(service)
    assert {row.status for row in rows.values()} == {CheckStatus.done}
    assert {key: row.p_fake for key, row in rows.items()} == pytest.approx(reference, abs=1e-6)


def test_a_failed_preparation_is_done_again_on_the_model_thread(ledger, tiny_store, reference, tmp_path):
    detector = _detector("tiny", tiny_store)
    service = _service(ledger, detector, tmp_path, prepare_ahead=True)
    failing = detector.prepare

    def fails_on_the_prefetch_thread(images, known=None):
        if detector.phase == "prefetch":
            raise RuntimeError("a processor broke")
        return failing(images, known)

    detector.prepare = fails_on_the_prefetch_thread
    _file(service, tmp_path, SEEDS[:3])
    batch = _run_batch(service, expected=3)
    assert batch.prepared_ahead is None and detector.calls[0][1] is None
    assert detector.prepared_in == ["models"]
    rows = _stored(service)
    assert {row.status for row in rows.values()} == {CheckStatus.done}
    assert {key: row.p_fake for key, row in rows.items()} == pytest.approx(
        {key: reference[key] for key in rows}, abs=1e-6
    )


# ---------------------------------------------------------------- the simulated device


@pytest.fixture(scope="module")
def sim_store(tmp_path_factory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("sim-models"), allow_download=False)


TIMES = {"caption": 1.0, "ground": 2.0, "embed_image": 0.5, "embed_text": 0.25}


def test_a_batch_reports_the_simulated_devices_busy_time(ledger, sim_store, tmp_path):
    device = simulated.configure(TIMES)
    try:
        detector = _detector("sim", sim_store, head=untrained_head)
        service = _service(ledger, detector, tmp_path, prepare_ahead=True)
        _file(service, tmp_path, SEEDS)
        counted = metrics.DEVICE_BUSY.labels("cpu")._value.get()
        before = device.busy_s
        batch = _run_batch(service, expected=len(SEEDS))
    finally:
        simulated.configure(None)
    rows = _stored(service)
    assert {row.status for row in rows.values()} == {CheckStatus.done}
    assert {row.verdict_reason for row in rows.values()} == {simulated.SIMULATED_MARK}
    objects = sum(len(detection.objects) for detection in batch.detections.values())
    images = len(batch.detections)
    expected_ms = images * (TIMES["caption"] + TIMES["ground"]) + (images + objects) * (
        TIMES["embed_image"] + TIMES["embed_text"]
    )
    assert images == 4 and objects > 0
    assert batch.busy_ms == pytest.approx(expected_ms, abs=1e-6)
    assert (device.busy_s - before) * 1000 == pytest.approx(expected_ms, abs=1e-6)
    assert metrics.DEVICE_BUSY.labels("cpu")._value.get() - counted == pytest.approx(expected_ms / 1000, abs=1e-9)
    assert batch.busy_ms <= batch.model_ms  # the device was held within the models' time


# ---------------------------------------------------------------- the feed benchmark's embedded run


@pytest.mark.slow
def test_the_feed_benchmark_runs_embedded_on_the_sim_profile(tmp_path):
    """Seconds: it generates the sim profile's processors and runs the worker's GPU loop on 8 + 4 JPEGs."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "tests.bench.bench_feed", "--mode", "embedded", "--profile", "sim", "--n", "8",
        "--batch-size", "4", "--json", "--model-dir", str(tmp_path / "models"),
    ]  # fmt: skip
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    inline = summary["embedded"]["inline"]
    assert summary["n"] == 8 and summary["batch_size"] == 4
    assert inline["img_s"] > 0 and 0 < inline["busy"] <= 1
    assert inline["cpu_ms_per_image"]["process"] > 0
    models = tmp_path / "models"
    names = sorted(spec.name for spec in get_profile("sim").specs.values())
    assert sorted(path.name for path in models.iterdir()) == names
    assert not list(models.rglob("*.safetensors"))  # processors only: no weights were made
