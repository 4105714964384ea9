"""Background downloads: a batch waits for a download only until its read wait, the download goes on bounded (per
process, per host, in time, in what is kept), and the check's next claim takes what it got."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.core.errors import ItemError
from worker.sources.downloads import Deferred, Downloads, host_of
from worker.sources.kinds import BusyHost


class Server:
    """A fake `load`: each URL's body is its path, served at once unless its path starts with /stall, which waits
    for `release` (or `timeout_s`, then fails as a fetch would)."""

    def __init__(self, timeout_s: float = 5.0):
        self.release = threading.Event()
        self.timeout_s = timeout_s
        self.running: dict[str, int] = {}
        self.most: dict[str, int] = {}
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, source: dict) -> bytes:
        host = host_of(source)
        with self._lock:
            self.calls += 1
            self.running[host] = self.running.get(host, 0) + 1
            self.most[host] = max(self.most.get(host, 0), self.running[host])
        try:
            path = source["url"].split("/", 3)[3]
            if path.startswith("stall") and not self.release.wait(self.timeout_s):
                raise ItemError("took too long", code="url.timeout")
            if path.startswith("missing"):
                raise ItemError("404", code="url.http_4xx")
            return path.encode()
        finally:
            with self._lock:
                self.running[host] -= 1


def downloads(server: Server, **options) -> Downloads:
    values = {"concurrency": 4, "per_host": 2, "timeout_s": server.timeout_s, "first_delay_s": 0.5}
    return Downloads(server, max_bytes=1 << 20, **{**values, **options})


def url(host: str, path: str) -> dict:
    return {"url": f"http://{host}/{path}"}


def soon(seconds: float = 0.2) -> float:
    return time.monotonic() + seconds


def test_a_quick_download_is_waited_for_and_not_kept():
    server = Server()
    pool = downloads(server)
    assert pool.read("c1", url("a.test", "one"), soon()) == b"one"
    assert len(pool) == 0 and pool.running == 0


def test_an_error_is_the_checks_own():
    pool = downloads(Server())
    with pytest.raises(ItemError) as caught:
        pool.read("c1", url("a.test", "missing"), soon())
    assert caught.value.code == "url.http_4xx" and len(pool) == 0


def test_a_late_download_defers_its_check_goes_on_and_is_taken_by_its_next_claim():
    server = Server()
    pool = downloads(server)
    started = time.monotonic()
    with pytest.raises(Deferred) as first:
        pool.read("c1", url("a.test", "stall"), soon(0.2))
    assert 0.2 <= time.monotonic() - started < 1.0
    assert (first.value.reason, first.value.delay_s, first.value.permanent) == ("downloading", 0.5, False)
    started = time.monotonic()
    with pytest.raises(Deferred) as again:  # still running: no wait at all this time, and back later
        pool.read("c1", url("a.test", "stall"), soon(5))
    assert time.monotonic() - started < 0.1 and again.value.delay_s == 1.0
    server.release.set()
    while pool.running:
        time.sleep(0.01)
    assert pool.read("c1", url("a.test", "stall"), soon()) == b"stall"
    assert server.calls == 1 and len(pool) == 0  # downloaded once, taken, forgotten


def test_a_download_that_never_answers_ends_its_check_with_the_downloads_error():
    server = Server(timeout_s=0.3)
    pool = downloads(server)
    with pytest.raises(Deferred) as deferred:
        pool.read("c1", url("a.test", "stall"), soon(0.1))
    assert deferred.value.delay_s <= 0.5
    time.sleep(0.4)
    with pytest.raises(ItemError) as ended:
        pool.read("c1", url("a.test", "stall"), soon())
    assert ended.value.code == "url.timeout"


def test_a_deferral_never_asks_to_come_back_after_the_download_surely_ended():
    pool = downloads(Server(timeout_s=2.0), first_delay_s=0.5)
    delays = []
    for _ in range(6):
        with pytest.raises(Deferred) as deferred:
            pool.read("c1", url("a.test", "stall"), soon(0.01))
        delays.append(deferred.value.delay_s)
    assert delays[:3] == [0.5, 1.0, 2.0] and max(delays) <= 2.0 + 0.5


def test_a_stalling_host_holds_only_its_own_slots():
    server = Server()
    pool = downloads(server, concurrency=4, per_host=2)
    reasons = []
    for i in range(6):
        with pytest.raises(Deferred) as deferred:
            pool.read(f"s{i}", url("stall.test", f"stall{i}"), soon(0.05))
        reasons.append(deferred.value.reason)
    assert reasons == ["downloading"] * 2 + ["waiting"] * 4
    assert server.most["stall.test"] == 2
    started = time.monotonic()
    assert [pool.read(f"o{i}", url("other.test", f"img{i}"), soon(1)) for i in range(10)] == [
        f"img{i}".encode() for i in range(10)
    ]
    assert time.monotonic() - started < 0.5
    server.release.set()


def test_the_process_limit_holds_across_hosts_and_a_waiting_check_starts_when_a_slot_frees():
    server = Server()
    pool = downloads(server, concurrency=2, per_host=2)
    for i in range(2):
        with pytest.raises(Deferred):
            pool.read(f"s{i}", url(f"h{i}.test", "stall"), soon(0.05))
    with pytest.raises(Deferred) as waiting:
        pool.read("w", url("w.test", "img"), soon(0.05))
    assert waiting.value.reason == "waiting" and pool.running == 2
    server.release.set()
    while pool.running:
        time.sleep(0.01)
    assert pool.read("w", url("w.test", "img"), soon(1)) == b"img"  # a slot is free now: it starts and is waited for


def test_a_check_that_never_finds_a_slot_ends_as_a_transient_timeout():
    server = Server()
    pool = downloads(server, concurrency=1, per_host=1, max_deferrals=3)
    with pytest.raises(Deferred):
        pool.read("s", url("a.test", "stall"), soon(0.01))
    for _ in range(3):
        with pytest.raises(Deferred) as waiting:
            pool.read("w", url("a.test", "img"), soon(0.01))
        assert waiting.value.reason == "waiting"
    with pytest.raises(BusyHost) as busy:
        pool.read("w", url("a.test", "img"), soon(0.01))
    assert (busy.value.code, busy.value.permanent) == ("url.timeout", False)
    server.release.set()


def test_what_is_kept_is_bounded_in_number_bytes_and_time():
    server = Server()
    pool = downloads(server, concurrency=64, per_host=64, max_entries=8, keep_s=0.3)
    for i in range(40):
        with pytest.raises(Deferred):
            pool.read(f"c{i}", url("a.test", f"stall{i}"), soon(0.001))
    assert len(pool) == 40  # running downloads are kept: each holds a thread, at most `concurrency`
    server.release.set()
    while pool.running:
        time.sleep(0.01)
    assert len(pool) <= 8
    time.sleep(0.35)
    pool.read("fresh", url("a.test", "img"), soon())  # the next read forgets what waited too long
    assert len(pool) == 0


def test_kept_bodies_are_bounded_in_bytes():
    server = Server()
    pool = Downloads(server, concurrency=8, per_host=8, timeout_s=5, first_delay_s=0.5, max_bytes=12)
    for i in range(6):
        with pytest.raises(Deferred):
            pool.read(f"c{i}", url("a.test", f"stall{i}"), soon(0.001))
    server.release.set()
    while pool.running:
        time.sleep(0.01)
    assert len(pool) == 2  # "stall4", "stall5": 12 bytes
    assert pool.read("c5", url("a.test", "stall5"), soon()) == b"stall5"


def test_another_source_under_the_same_check_is_downloaded_afresh():
    server = Server()
    pool = downloads(server)
    assert pool.read("c1", url("a.test", "one"), soon()) == b"one"
    assert pool.read("c1", url("a.test", "two"), soon()) == b"two"


def test_only_urls_and_s3_objects_are_downloaded_here_unless_a_batch_waits_for_every_download():
    pool = downloads(Server(timeout_s=5.0), first_delay_s=1.0)
    assert pool.handles({"url": "http://a/"}) and pool.handles({"s3": {"bucket": "b", "key": "k"}})
    assert not pool.handles({"blob": "0" * 64}) and not pool.handles({"path": "/x"})
    assert not downloads(Server(timeout_s=5.0), first_delay_s=5.0).handles({"url": "http://a/"})
    assert host_of({"s3": {"bucket": "b", "key": "k"}}) == "s3:b" and host_of({"url": "http://A.test:8/x"}) == "a.test"
