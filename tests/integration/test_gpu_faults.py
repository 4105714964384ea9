"""A GPU process that can no longer be trusted ends itself and is replaced, through a real `item worker`.

Each fault is armed with the test-only injector (worker.gpu.faults: a file in ITEM_TEST_FAULTS that the first GPU
process to reach its point takes), since a spawned process inherits no monkeypatch and this machine has no GPU:
the CUDA error is the very type PyTorch raises for one (`torch.AcceleratorError`), raised where the detector runs.

    a CUDA error that poisons the device   ─▶ batch retried as gpu.fault, process ends 71, replaced, checks done
    a model call past the batch's budget   ─▶ the watchdog retries it as check.timeout, ends it 72, checks done
    a supervised thread (store) that dies  ─▶ counted, process ends 70, its checks given back, done
"""

from __future__ import annotations

import re
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.brokers import free_port
from tests.integration.stack import Worker, make_stack
from worker.gpu import exits, faults

BUDGET_S = 6  # the batch time budget of this stack: a tiny batch runs well within it, a 15 s model call does not


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    yield from make_stack(
        postgres_url, tiny_store, tmp_path_factory.mktemp("gpu-faults"), ITEM_BATCH_TIME_BUDGET_S=str(BUDGET_S)
    )


@pytest.fixture(scope="module")
def armory(stack):
    folder = stack.folder / "faults"
    folder.mkdir()
    return folder


@pytest.fixture(scope="module")
def worker(stack, armory):
    port = free_port()
    env = {**stack.env, faults.VARIABLE: str(armory), "ITEM_METRICS_PORT": str(port), "ITEM_METRICS_ADDR": "127.0.0.1"}
    process = Worker(stack, "gpu-faults", env=env)
    process.port = port
    yield process
    process.stop()


def _arm(armory, point: str, fault: str) -> None:
    (armory / f"{point}.tmp").write_text(fault)
    (armory / f"{point}.tmp").rename(armory / point)  # whole, or not at all, for a process looking now


def _struck(armory, point: str, timeout: float = 60) -> int:
    """The pid of the GPU process the fault struck."""
    deadline = time.monotonic() + timeout
    while not (taken := list(armory.glob(f"{point}.struck.*"))):
        assert time.monotonic() < deadline, f"no process reached {point}"
        time.sleep(0.1)
    (path,) = taken
    path.unlink()
    return int(path.name.rsplit(".", 1)[1])


def _replaced(worker: Worker, pid: int, status: int) -> int:
    """Waits for the fleet to log why `pid` ended and for its replacement to be ready; returns the new pid."""
    _ended(worker, pid, status)
    deadline = time.monotonic() + 90
    while True:
        new = worker.gpu_pids()[-1]
        if new != pid and re.search(rf"GPU loop 0 \(pid {new}\) ready", worker.log.read_text()):
            return new
        assert time.monotonic() < deadline, worker.log.read_text()[-3000:]
        time.sleep(0.2)


def _ended(worker: Worker, pid: int, status: int) -> None:
    worker.wait_for(rf"\(pid {pid}\) exited with status {status} after \d+s: {re.escape(exits.reason(status))}", 60)


def _metric(worker: Worker, name: str, **labels: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{worker.port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def _finish_on(stack, check_ids: list[str], pid: int, attempts: int) -> None:
    rows = stack.wait_terminal(check_ids, timeout=120)
    assert {(row.status, row.attempts) for row in rows.values()} == {("done", attempts)}, {
        row.id: (row.status, row.error_code, row.attempts) for row in rows.values()
    }
    assert {row.lease_owner.rsplit(":", 1)[1] for row in rows.values()} == {str(pid)}


def _submit(stack, seeds: range) -> list[str]:
    return [one["check_id"] for one in stack.submit(*(str(stack.image(seed)) for seed in seeds))]


def test_a_cuda_error_that_poisons_the_device_replaces_the_process_and_the_batch_is_redone(stack, worker, armory):
    retried = _metric(worker, "item_retries_total", code="gpu.fault")
    _arm(armory, "models", "cuda CUDA error: an illegal memory access was encountered")
    checks = _submit(stack, range(1200, 1203))  # one batch (ITEM_BATCH_SIZE 4)

    poisoned = _struck(armory, "models")
    fresh = _replaced(worker, poisoned, exits.GPU_FAULT)

    _finish_on(stack, checks, fresh, attempts=2)  # the faulty run counted as an attempt, as any claim does
    log = worker.log.read_text()
    assert "CUDA error, this process's GPU context is unusable: CUDA error: an illegal memory access" in log
    assert _metric(worker, "item_retries_total", code="gpu.fault") == retried + len(checks)
    assert worker.process.poll() is None  # the Celery worker lived on


def test_a_batch_past_its_budget_in_the_models_is_retried_as_timeout_and_the_process_replaced(stack, worker, armory):
    retried = _metric(worker, "item_retries_total", code="check.timeout")
    _arm(armory, "models", f"sleep {BUDGET_S * 3}")  # a model call nothing can interrupt
    checks = _submit(stack, range(1300, 1302))

    stuck = _struck(armory, "models")
    struck_at = time.monotonic()
    _ended(worker, stuck, exits.WATCHDOG)
    assert time.monotonic() - struck_at < BUDGET_S * 2  # by the watchdog at the budget, long before the call ends
    fresh = _replaced(worker, stuck, exits.WATCHDOG)

    _finish_on(stack, checks, fresh, attempts=2)
    assert "still in the models past its time budget" in worker.log.read_text()
    assert _metric(worker, "item_retries_total", code="check.timeout") == retried + len(checks)


def test_a_dead_store_thread_ends_the_process_and_its_checks_are_redone(stack, worker, armory):
    deaths = _metric(worker, "item_thread_deaths_total", thread="store")
    _arm(armory, "store", "raise a bug in the store thread")
    checks = _submit(stack, range(1400, 1402))

    dead = _struck(armory, "store")
    fresh = _replaced(worker, dead, exits.THREAD_DIED)

    _finish_on(stack, checks, fresh, attempts=2)  # stored by no one: their lease ran out, the replacement took them
    assert _metric(worker, "item_thread_deaths_total", thread="store") == deaths + 1
    assert "thread item-store crashed; ending this process" in worker.log.read_text()
