"""A C2PA parse that never returns (a native hang, stood for by a parse function that blocks until the test ends)
costs only its own image's manifest: the next parse runs on a fresh thread within its limit, and hangs cannot
pile up threads."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.core import provenance as prov
from pipeline.core.provenance import ProvenanceReader
from pipeline.core.timed_calls import CallTimeout, TimedCalls, TooManyStuck
from tests import provenance_files as files

LIMIT_S = 1.0  # ample for the normal parse (tens of milliseconds), even on a loaded machine


@pytest.fixture(scope="module")
def creds():
    return files.credentials()


@pytest.fixture(scope="module")
def images(creds):
    """A signed image whose parse hangs, and a signed image whose parse is normal."""
    return files.signed(files.jpeg(color=(1, 2, 3)), creds), files.signed(files.jpeg(), creds)


@pytest.fixture
def hanging(monkeypatch, images):
    """Parses of the first image block until the test ends; the process's parses start afresh and end with it."""
    release, real = threading.Event(), prov._c2pa_report

    def parse(data, mime, context):
        if data == images[0]:
            release.wait()  # what a native parser stuck in a loop looks like from here
        return real(data, mime, context)

    monkeypatch.setattr(prov, "_c2pa_report", parse)
    monkeypatch.setattr(prov, "_parses_now", None)
    yield release
    release.set()
    _wait_for(lambda: _c2pa_threads() == 0)


def _c2pa_threads() -> int:
    return sum(thread.name == "item-c2pa" and thread.is_alive() for thread in threading.enumerate())


def _wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _codes(found) -> list[str]:
    return [error.code for error in found.errors]


def test_after_hung_parses_the_next_parse_still_runs_within_its_limit(creds, images, hanging):
    reader = ProvenanceReader(creds.ca_pem, timeout_s=LIMIT_S)
    stuck, normal = images
    for _ in range(prov.C2PA_THREADS + 1):  # as many hangs as a fixed pool had threads, and one more
        found = reader.read(stuck, "JPEG")
        assert _codes(found) == ["provenance.timeout"] and found.c2pa is None
    started = time.monotonic()
    found = reader.read(normal, "JPEG")
    assert time.monotonic() - started < LIMIT_S
    assert found.errors == [] and found.c2pa.validation_state == "valid" and found.declared_by == ["c2pa"]
    assert _c2pa_threads() == prov.C2PA_THREADS + 1  # the stuck ones, left behind; the normal one has ended


def test_hangs_are_bounded_and_then_refused_at_once_until_they_end(creds, images, hanging):
    reader = ProvenanceReader(creds.ca_pem, timeout_s=0.05)
    stuck, normal = images
    for _ in range(prov.MAX_ABANDONED):
        assert _codes(reader.read(stuck, "JPEG")) == ["provenance.timeout"]
    for image in [stuck] * 20 + [normal]:  # no more threads are spent, on hanging images or any other
        started = time.monotonic()
        found = reader.read(image, "JPEG")
        assert time.monotonic() - started < 0.05
        assert _codes(found) == ["provenance.c2pa_unavailable"]
        assert f"{prov.MAX_ABANDONED} calls are still running past their time limit" in found.errors[0].message
    assert _c2pa_threads() == prov.MAX_ABANDONED
    hanging.set()  # the stuck parses end after all: C2PA is read again
    _wait_for(lambda: prov._parses().abandoned == 0)
    assert _c2pa_threads() == 0
    assert ProvenanceReader(creds.ca_pem, timeout_s=LIMIT_S).read(normal, "JPEG").c2pa.validation_state == "valid"


def test_concurrent_hangs_never_hold_more_threads_than_the_bound():
    release = threading.Event()
    calls = TimedCalls("bounded-test", concurrency=2, max_abandoned=3)
    outcomes: list[str] = []

    def caller() -> None:
        for _ in range(10):
            try:
                calls.run(release.wait, (), 0.05)
                outcomes.append("ended")
            except CallTimeout:
                outcomes.append("timeout")
            except TooManyStuck:
                outcomes.append("refused")

    callers = [threading.Thread(target=caller) for _ in range(10)]
    try:
        for thread in callers:
            thread.start()
        for thread in callers:
            thread.join(30)
        alive = sum(thread.name == "bounded-test" for thread in threading.enumerate())
        assert 3 <= alive == calls.abandoned <= 2 + 3 - 1  # every thread started is stuck, and no more started
        assert len(outcomes) == 100 and "ended" not in outcomes and "refused" in outcomes
    finally:
        release.set()


def test_a_call_that_ends_returns_its_value_or_raises_its_error():
    calls = TimedCalls("plain-test", concurrency=1, max_abandoned=1)
    assert calls.run(sum, ([1, 2],), 1.0) == 3
    with pytest.raises(ZeroDivisionError):
        calls.run(lambda: 1 / 0, (), 1.0)
    assert calls.abandoned == 0
