"""The worker is a Celery worker, operated with Celery's own tools: `celery -A worker.intake.app worker` runs the
intake and the GPU loops; `inspect ping|stats|item` see them; `control shutdown` is a warm shutdown that leaves
nothing `running`; task events reach Flower, whose HTTP API lists the worker and its `item.check` tasks."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.conftest import encode, noise_image
from tests.integration.brokers import free_port
from tests.integration.stack import make_stack
from worker.ledger.models import CheckRow

CELERY = Path(sys.executable).parent / "celery"
APP = "worker.intake.app"
ARTIFACTS = Path(os.environ.get("ITEM_TEST_ARTIFACTS", Path(__file__).parents[2] / "test-artifacts")) / "flower"


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    yield from make_stack(postgres_url, tiny_store, tmp_path_factory.mktemp("celery"), ITEM_BATCH_SIZE="2")


class CeleryWorker:
    """`celery -A worker.intake.app worker`, as a team running Celery starts it."""

    def __init__(self, stack, name: str, *options: str, env: dict | None = None):
        self.name = f"{name}-{os.getpid()}@{socket.gethostname()}"
        self.log = stack.folder / f"{name}.log"
        command = [str(CELERY), "-A", APP, "worker", "--hostname", self.name, "--loglevel", "INFO", *options]
        self.process = subprocess.Popen(
            command, env=env or stack.env, stdout=self.log.open("w"), stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + 90
        while "item worker ready." not in self.log.read_text():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the worker never got ready:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def wait_exit(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            pytest.fail(f"the worker did not stop in {timeout}s:\n{self.log.read_text()[-3000:]}")

    def gpu_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"GPU loop \d+ starting \(pid (\d+)\)", self.log.read_text())]


def celery(stack, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CELERY), "-A", APP, *args], env=stack.env, capture_output=True, text=True, timeout=timeout
    )


def inspect(stack, worker: CeleryWorker, command: str) -> dict:
    result = celery(stack, "inspect", command, "--json", "--timeout", "10", "--destination", worker.name)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)[worker.name]


def _send(stack, count: int, prefix: str) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(count)]
    for i, external_id in enumerate(ids):
        image = base64.b64encode(encode(noise_image(300 + i))).decode()
        stack.send(external_id=external_id, image={"b64": image})
    return ids


def _statuses(stack, external_ids: list[str]) -> dict[str, str]:
    with stack.ledger.session() as session:
        rows = session.execute(
            sa.select(CheckRow.external_id, CheckRow.status).where(CheckRow.external_id.in_(external_ids))
        )
        return dict(rows.all())


def _wait_done(stack, external_ids: list[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while (statuses := _statuses(stack, external_ids)) and (
        len(statuses) < len(external_ids) or set(statuses.values()) - {"done"}
    ):
        assert time.monotonic() < deadline, statuses
        time.sleep(0.2)


def test_inspect_sees_the_worker_and_its_gpu_loop_and_control_shutdown_is_warm(stack):
    worker = CeleryWorker(stack, "inspected", "--gpus", "1")
    # given a worker that has run a few checks
    ids = _send(stack, 4, "inspect")
    _wait_done(stack, ids)

    # when a Celery team looks at it with Celery's own tools
    assert inspect(stack, worker, "ping") == {"ok": "pong"}
    assert inspect(stack, worker, "active") == []  # batches run outside Celery's request tracking
    item = inspect(stack, worker, "item")
    stats = inspect(stack, worker, "stats")

    # then it sees its GPU loop: ready, on the CPU here, with its version and what it did
    (loop,) = item["gpu_loops"]
    assert loop["status"] == "ready" and loop["device"] == "cpu" and loop["version"].startswith("pv-")
    assert loop["pid"] == worker.gpu_pids()[-1] and loop["restarts"] == 0
    deadline = time.monotonic() + 10  # the loop reports its counters every few seconds
    while loop.get("checks", 0) < len(ids):
        assert time.monotonic() < deadline, loop
        time.sleep(1)
        (loop,) = inspect(stack, worker, "item")["gpu_loops"]
    assert loop["batches"] >= 2 and loop["leases"] == 0
    assert stats["item"]["ready"] is True and stats["item_upkeep"]["deliverer"] == "alive"
    assert stats["pool"]["implementation"].endswith("thread:TaskPool")

    # and `control shutdown` stops it warmly, in the middle of work: nothing is left running
    more = _send(stack, 6, "shutdown")
    time.sleep(1.0)
    celery(stack, "control", "shutdown", "--destination", worker.name)  # a shutdown is never answered
    assert worker.wait_exit(120) == 0
    log = worker.log.read_text()
    assert "GPU loops stopped" in log
    with pytest.raises(ProcessLookupError):
        os.kill(worker.gpu_pids()[-1], 0)
    statuses = _statuses(stack, more)
    assert len(statuses) == len(more)  # every message was filed before the worker went
    assert "running" not in statuses.values(), statuses


def test_a_killed_gpu_process_is_replaced_and_sigterm_is_warm(stack):
    worker = CeleryWorker(stack, "supervised", "--gpus", "1")
    first = worker.gpu_pids()[-1]
    os.kill(first, signal.SIGKILL)
    deadline = time.monotonic() + 90
    while len(worker.gpu_pids()) < 2 or inspect(stack, worker, "item")["gpu_loops"][0]["status"] != "ready":
        assert time.monotonic() < deadline, worker.log.read_text()[-2000:]
        time.sleep(0.5)
    (loop,) = inspect(stack, worker, "item")["gpu_loops"]
    assert loop["pid"] == worker.gpu_pids()[-1] != first and loop["restarts"] == 1

    ids = _send(stack, 6, "sigterm")
    time.sleep(1.0)
    os.kill(worker.process.pid, signal.SIGTERM)  # the main process only, as a process manager sends it
    assert worker.wait_exit(120) == 0
    statuses = _statuses(stack, ids)
    assert len(statuses) == len(ids) and "running" not in statuses.values(), statuses


def test_an_intake_only_worker_files_messages_and_runs_no_gpu_loop(stack):
    worker = CeleryWorker(stack, "intake-only", "--gpus", "0")
    ids = _send(stack, 3, "intake-only")
    deadline = time.monotonic() + 20
    while len(_statuses(stack, ids)) < len(ids):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert set(_statuses(stack, ids).values()) == {"queued"}  # filed, and nobody here runs models
    assert inspect(stack, worker, "item")["gpu_loops"] == []
    os.kill(worker.process.pid, signal.SIGTERM)
    assert worker.wait_exit(60) == 0


def _get_json(url: str):
    with urllib.request.urlopen(url, timeout=10) as answer:
        return json.loads(answer.read())


def test_flower_lists_the_worker_and_its_item_check_tasks(stack):
    worker = CeleryWorker(stack, "flowered", "--gpus", "1")
    port = free_port()
    env = {**stack.env, "FLOWER_UNAUTHENTICATED_API": "true"}
    flower_log = stack.folder / "flower.log"
    flower = subprocess.Popen(
        [str(CELERY), "-A", APP, "flower", f"--port={port}", "--address=127.0.0.1"],
        env=env, stdout=flower_log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:  # Flower listens once it has connected to the broker
            try:
                urllib.request.urlopen(base, timeout=2).close()
                break
            except OSError:
                assert flower.poll() is None and time.monotonic() < deadline, flower_log.read_text()[-3000:]
                time.sleep(0.5)
        ids = _send(stack, 3, "flower")
        _wait_done(stack, ids)

        deadline = time.monotonic() + 30
        while True:
            workers = _get_json(f"{base}/api/workers?refresh=1")
            tasks = _get_json(f"{base}/api/tasks?taskname=item.check")
            succeeded = [task for task in tasks.values() if task.get("state") == "SUCCESS"]
            if worker.name in workers and len(succeeded) >= len(ids):
                break
            assert time.monotonic() < deadline, (list(workers), tasks)
            time.sleep(1)
        assert all(task["name"] == "item.check" and task["worker"] == worker.name for task in succeeded)
        shown = " ".join(task["kwargs"] for task in succeeded)
        assert all(external_id in shown for external_id in ids) and "b64" in shown
        assert not any(len(task["kwargs"]) > 200 for task in tasks.values())  # never the image itself
        assert json.loads(succeeded[0]["result"])["status"] == "queued"
        _screenshot(f"{base}/tasks", ARTIFACTS / "flower-tasks.png")
    finally:
        flower.terminate()
        flower.wait(30)
        worker.process.terminate()
        worker.wait_exit(60)


def _screenshot(url: str, path: Path) -> None:
    """Flower's task page in Chromium, kept to be looked at after a run (skipped where Chromium is not installed)."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        return
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 700})
        page.goto(url)
        page.wait_for_selector("text=item.check", timeout=20_000)
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path))
        browser.close()


def test_what_a_killed_worker_held_is_filed_by_another_after_the_visibility_timeout(stack):
    from tests.bench.bench_redelivery import measure

    # given a worker holding messages unacknowledged (its ledger is unreachable), SIGKILLed, and a healthy one
    short = {**stack.env, "ITEM_INTAKE_VISIBILITY_TIMEOUT_S": "5"}
    result = measure(replace(stack, env=short), messages=6)
    # then every message is filed, within the visibility timeout and a restore sweep (2 s), plus start-up slack
    assert result["filed_after_kill_s"] < 5 + 2 + 15, result


def test_a_worker_without_intake_leaves_messages_to_others_and_still_answers(stack):
    worker = CeleryWorker(stack, "no-intake", "--gpus", "0", "--no-intake")
    try:
        before = stack.queue_length()
        ids = _send(stack, 2, "no-intake")
        time.sleep(3)
        assert _statuses(stack, ids) == {} and stack.queue_length() == before + 2  # still the broker's
        assert inspect(stack, worker, "item")["intake"] is False
    finally:
        os.kill(worker.process.pid, signal.SIGTERM)
        worker.wait_exit(60)
    taker = CeleryWorker(stack, "taker", "--gpus", "0")
    try:
        deadline = time.monotonic() + 20
        while len(_statuses(stack, ids)) < len(ids):
            assert time.monotonic() < deadline
            time.sleep(0.1)
    finally:
        os.kill(taker.process.pid, signal.SIGTERM)
        taker.wait_exit(60)
