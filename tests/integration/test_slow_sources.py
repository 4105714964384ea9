"""No slow source holds a batch: a real GPU loop (tiny models, PostgreSQL ledger) reading URLs from local HTTP
servers whose answers can be held. A check whose download is late leaves its batch (queued again, its attempt not
counted) while the download goes on; the others are done in about the read wait; the late one ends done when its
server answers within the fetch timeout, or url.timeout when it never does; one stalling host never takes the
download slots of another."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.conftest import encode, noise_image
from worker.gpu.batches import CheckService
from worker.gpu.loop import Loop
from worker.intake.filing import CheckRequest, Intake
from worker.ledger.models import utcnow
from worker.ledger.states import CheckStatus, Priority
from worker.ledger.store import Lease
from worker.ops import metrics
from worker.settings import Settings

READ_WAIT_S = 0.5


@pytest.fixture(scope="module")
def database_url(postgres_url):
    """PostgreSQL only (the `ledger` fixture's database): the loop listens for its wake-ups there."""
    return postgres_url


class ImageServer:
    """/img/<n>.png answers at once; /stall/<name>.png waits until `release(name)` (at most 60 s) before answering.
    Counts the stalled requests held at once."""

    def __init__(self, address: str):
        self.held = self.most_held = 0
        self._events: dict[str, threading.Event] = {}
        self._all_released = False
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                kind, _, name = self.path.strip("/").partition("/")
                if kind == "stall":
                    server._hold(name)
                body = encode(noise_image(abs(hash(self.path)) % 10_000, 48, 40))
                with suppress(BrokenPipeError, ConnectionResetError):  # a download that gave up
                    self.send_response(200)
                    self.send_header("Content-Type", "image/png")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer((address, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{address}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def _event(self, name: str) -> threading.Event:
        with self._lock:
            event = self._events.setdefault(name, threading.Event())
            if self._all_released:
                event.set()
            return event

    def _hold(self, name: str) -> None:
        with self._lock:
            self.held += 1
            self.most_held = max(self.most_held, self.held)
        try:
            self._event(name).wait(60)
        finally:
            with self._lock:
                self.held -= 1

    def release(self, name: str | None = None) -> None:
        """Lets `name` answer (every name, now and from now on, when None)."""
        if name is not None:
            self._event(name).set()
            return
        with self._lock:
            self._all_released = True
            events = list(self._events.values())
        for event in events:
            event.set()

    def close(self) -> None:
        self.release()
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[tuple[ImageServer, ImageServer]]:
    """Two hosts: 127.0.0.1 and 127.0.0.2 (the whole 127/8 is this machine's loopback)."""
    one, two = ImageServer("127.0.0.1"), ImageServer("127.0.0.2")
    yield one, two
    one.close()
    two.close()


def _service(ledger, detector, **overrides) -> CheckService:
    values = {
        "database_url": ledger.engine.url.render_as_string(hide_password=False),
        "batch_size": 8,
        "batch_max_wait_s": 0.2,
        "batch_read_wait_s": READ_WAIT_S,
        "idle_poll_s": 0.1,
        "fetch_timeout_s": 8,
        "fetch_allowed_networks": ["127.0.0.0/8"],
        "retry_backoff_s": 0.2,
        "thumbnail_max_side": 0,
        "read_provenance": False,
    }
    service = CheckService(Settings(**{**values, **overrides}), ledger, detector)
    service.register_version(activate=True)
    return service


def _file(service: CheckService, urls: list[str], prefix: str) -> list[str]:
    requests = [CheckRequest(f"{prefix}-{i}", {"url": url}) for i, url in enumerate(urls)]
    return [one.check.id for one in Intake(service.settings, service.ledger).file(requests)]


def _rows(service: CheckService, ids: list[str]) -> dict:
    with service.ledger.session() as session:
        return {row.id: row for row in service.ledger.checks_by_id(session, ids)}


def _wait(condition, timeout_s: float, what: str) -> float:
    """Seconds until `condition()` held; fails after `timeout_s`."""
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"timed out waiting for {what}"
        time.sleep(0.02)
    return time.monotonic() - started


def _finished(service: CheckService, ids: list[str], status: str = "done"):
    return lambda: all(row.status == status for row in _rows(service, ids).values())


@contextmanager
def _running(service: CheckService) -> Iterator[Loop]:
    loop = Loop(service)
    thread = threading.Thread(target=loop.run_forever, name="test-loop", daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.stop.set()
        thread.join(30)
        assert not thread.is_alive()


def _deferred(reason: str) -> float:
    return metrics.FETCH_DEFERRED.labels(reason)._value.get()


def test_a_stalled_url_leaves_its_batch_and_ends_done_when_its_server_answers(ledger, tiny_detector, servers):
    server, _ = servers
    service = _service(ledger, tiny_detector)
    quick = _file(service, [f"{server.url}/img/{i}.png" for i in range(7)], "quick")
    [stalled] = _file(service, [f"{server.url}/stall/late.png"], "late")
    deferrals = _deferred("downloading")
    with _running(service):
        took = _wait(_finished(service, quick), 20, "the quick checks")
        assert took < service.settings.fetch_timeout_s / 2  # the batch waited its read wait, not the fetch timeout
        row = _rows(service, [stalled])[stalled]
        assert row.status in (CheckStatus.queued, CheckStatus.running) and row.finished_at is None
        _wait(lambda: _rows(service, [stalled])[stalled].status == CheckStatus.queued, 5, "the stalled check queued")
        assert _rows(service, [stalled])[stalled].attempts == 0  # deferred: no attempt used
        assert _deferred("downloading") > deferrals
        more = _file(service, [f"{server.url}/img/{i}.png" for i in range(10, 18)], "more")  # still stalled
        assert _wait(_finished(service, more), 20, "checks filed during the stall") < 4
        server.release("late.png")
        _wait(_finished(service, [stalled]), 15, "the stalled check")
    row = _rows(service, [stalled])[stalled]
    assert (row.status, row.attempts, row.error_code) == (CheckStatus.done, 1, None)
    assert server.most_held == 1  # one download, in the background, taken by the check's next claim


def test_a_url_that_never_answers_ends_as_url_timeout_without_holding_a_batch(ledger, tiny_detector, servers):
    server, _ = servers
    service = _service(ledger, tiny_detector, fetch_timeout_s=2, max_attempts=1)
    [hung] = _file(service, [f"{server.url}/stall/never.png"], "never")
    started = time.monotonic()
    with _running(service):
        _wait(lambda: _rows(service, [hung])[hung].status == CheckStatus.queued, 5, "the hung check deferred")
        quick = _file(service, [f"{server.url}/img/{i}.png" for i in range(20, 36)], "meanwhile")
        assert _wait(_finished(service, quick), 20, "the checks filed meanwhile") < 4
        _wait(_finished(service, [hung], "failed"), 20, "the hung check")
    row = _rows(service, [hung])[hung]
    assert (row.status, row.error_code, row.attempts) == (CheckStatus.failed, "url.timeout", 1)
    assert time.monotonic() - started < 2 + 6  # its own fetch timeout, then the next claim found the error


def test_a_stalling_host_cannot_take_the_download_slots_of_another(ledger, tiny_detector, servers):
    stalling, other = servers
    service = _service(ledger, tiny_detector, fetch_per_host=2, fetch_concurrency=4)
    stalled = _file(service, [f"{stalling.url}/stall/s{i}.png" for i in range(6)], "stalling")  # claimed first
    quick = _file(service, [f"{other.url}/img/{i}.png" for i in range(12)], "other-host")
    waiting = _deferred("waiting")
    with _running(service):
        assert _wait(_finished(service, quick), 20, "the other host's checks") < 5
        assert stalling.most_held <= 2  # ITEM_FETCH_PER_HOST
        assert _deferred("waiting") > waiting  # the rest of the stalling host's checks found no slot
        assert all(row.attempts == 0 for row in _rows(service, stalled).values() if row.status == "queued")
        stalling.release()
        _wait(_finished(service, stalled), 30, "the stalling host's checks, once it answers")
    assert stalling.most_held <= 2


def test_defer_hands_back_only_the_checks_its_lease_holds(ledger, tiny_detector):
    service = _service(ledger, tiny_detector)
    _file(service, [f"http://img.test/{i}.png" for i in range(3)], "held")
    lease, other = Lease.new("test:1", 30), Lease.new("test:2", 30)
    claimed = service.claim(lease, 3, Priority.fresh)
    later = utcnow() + timedelta(seconds=30)
    ids = [check.id for check in claimed]
    with ledger.session() as session:
        assert ledger.defer(session, other, ids, later) == 0  # not its checks
        assert ledger.defer(session, lease, ids[:2], later) == 2
    rows = _rows(service, ids)
    for check_id in ids[:2]:
        row = rows[check_id]
        assert (row.status, row.attempts, row.lease_expires_at) == (CheckStatus.queued, 0, None)
        assert abs((row.available_at - later).total_seconds()) < 1
    assert (rows[ids[2]].status, rows[ids[2]].attempts) == (CheckStatus.running, 1)
    assert service.claim(Lease.new("test:3", 30), 3, Priority.fresh) == []  # not before available_at
