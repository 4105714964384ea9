"""Supervised threads: a death is logged with its traceback, counted, makes the process not ready, and is
restarted after a delay (or ends the process)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from worker.ops import metrics, supervise
from worker.ops.supervise import Supervised


def _deaths(part: str) -> float:
    return metrics.THREAD_DEATHS.labels(part)._value.get()


def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture
def fast_restarts(monkeypatch):
    monkeypatch.setattr(supervise, "RESTART_BACKOFF_S", (0.3, 1.0))


def test_a_thread_that_crashes_is_counted_not_ready_then_restarted(fast_restarts, caplog):
    stopping = threading.Event()
    runs = []

    def target() -> None:
        runs.append(time.monotonic())
        if len(runs) == 1:
            raise RuntimeError("boom in the first run")
        stopping.wait()

    before = _deaths("deliverer")
    thread = Supervised("deliverer", target, stopping=stopping).start()
    try:
        _until(lambda: _deaths("deliverer") == before + 1)
        assert "deliverer" in supervise.dead_parts()  # between the death and its restart
        _until(lambda: len(runs) == 2)
        _until(lambda: "deliverer" not in supervise.dead_parts())
        assert runs[1] - runs[0] >= 0.25  # after the backoff, not in a tight loop
        assert "boom in the first run" in caplog.text and "Traceback" in caplog.text
        assert threading.current_thread().name != "item-deliverer"
        assert any(t.name == "item-deliverer" for t in threading.enumerate())
    finally:
        thread.stop(5)
    assert not thread.is_alive()
    assert "deliverer" not in supervise.dead_parts()  # stopped on purpose: not watched any more
    assert _deaths("deliverer") == before + 1  # a stop is not a death


def test_a_thread_that_returns_unasked_is_a_death_too(fast_restarts):
    stopping = threading.Event()
    calls = []

    def target() -> None:
        calls.append(1)
        if len(calls) > 1:
            stopping.wait()

    before = _deaths("reconciler")
    thread = Supervised("reconciler", target, stopping=stopping).start()
    try:
        _until(lambda: len(calls) == 2)
        assert _deaths("reconciler") == before + 1
    finally:
        thread.stop(5)


def test_on_death_exit_ends_the_process_with_its_status():
    program = (
        "import threading, time\n"
        "from worker.ops.supervise import Supervised\n"
        "def target():\n"
        "    raise ValueError('the store broke')\n"
        "Supervised('store', target, on_death='exit').start()\n"
        "time.sleep(30)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60)
    assert done.returncode == supervise.EXIT_STATUS
    assert "the store broke" in done.stderr and "item-store" in done.stderr


def test_a_probe_that_raises_reads_as_dead():
    supervise.watch("broken-probe", lambda: 1 / 0)
    try:
        assert "broken-probe" in supervise.dead_parts()
    finally:
        supervise.unwatch("broken-probe")
