"""Deliveries at volume, on a real ledger (both databases), a real Redis and a real HTTP receiver: the stream
deliveries of a pass go to Redis in one round trip (counted on the wire by a proxy, not by the client), the
stream keeps results for a time rather than a count, and callbacks to one receiver reuse keep-alive connections.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import redis

from pipeline.core.results import PipelineVersion
from tests.integration.stack import REDIS_URL
from worker.ledger.outbox import claim_due, record_outcome
from worker.ledger.store import Ledger, NewCheck
from worker.outbox.delivery import Deliverer
from worker.settings import Settings
from worker.sources.addresses import AddressPolicy, FetchError
from worker.sources.fetch import post
from worker.sources.keepalive import KeptConnections

VERSION = PipelineVersion(caption="blip:a", ground="gdino:b", embed="clip:c", head="head:batching")
BURST_GAP_S = 0.05  # a client silent this long after writing is waiting for its answer
LOCAL = AddressPolicy(allowed=(ipaddress.ip_network("127.0.0.1/32"),))


class RoundTrips:
    """A TCP proxy in front of Redis that counts round trips: each time a client speaks after Redis answered it.

    A pipeline is one burst of commands, then one burst of answers: one round trip, however many commands.
    """

    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.count = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"redis://127.0.0.1:{self._server.getsockname()[1]}/0"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        client_spoke_last = False
        with client, upstream:
            while True:
                ready, _, _ = select.select([client, upstream], [], [])
                if client in ready:  # the client first: all of a burst is read before its answers pass
                    data = self._burst(client)
                    if not data:
                        return
                    self.count += not client_spoke_last
                    client_spoke_last = True
                    upstream.sendall(data)
                elif upstream in ready:
                    data = upstream.recv(1 << 20)
                    if not data:
                        return
                    client_spoke_last = False
                    client.sendall(data)

    @staticmethod
    def _burst(client: socket.socket) -> bytes:
        """What the client sends without waiting for an answer: a large pipeline reaches the proxy in several
        writes, and Redis, answering the first before the last came, would make it look like several trips."""
        data = client.recv(1 << 20)
        while data and select.select([client], [], [], BURST_GAP_S)[0]:
            more = client.recv(1 << 20)
            if not more:
                break
            data += more
        return data

    def close(self) -> None:
        self._server.close()


@pytest.fixture
def proxy() -> Iterator[RoundTrips]:
    url = redis.Redis.from_url(REDIS_URL).connection_pool.connection_kwargs
    counting = RoundTrips((url.get("host", "127.0.0.1"), url.get("port", 6379)))
    yield counting
    counting.close()


def _settings(**overrides) -> Settings:
    return Settings(database_url="sqlite://", delivery_backoff_s=0.001, delivery_backoff_max_s=0.002, **overrides)


def _queue_stream_deliveries(ledger: Ledger, n: int) -> list[str]:
    """`n` checks with a stream delivery each (the checks need not have ended for their rows to be sent)."""
    tag = uuid.uuid4().hex[:8]
    with ledger.session() as session:
        ledger.ensure_pipeline_version(session, VERSION, "tiny")
        news = [NewCheck(f"{tag}-{i}", {"url": "http://x/"}) for i in range(n)]
        checks = [check for check, _ in ledger.create_checks(session, VERSION.id, news)]
        for check in checks:
            record_outcome(session, check, results_stream=True)
    return [check.id for check in checks]


def test_the_stream_deliveries_of_a_pass_take_one_round_trip(ledger, stream, proxy):
    name, client = stream
    deliverer = Deliverer(_settings(results_stream=name, results_stream_url=proxy.url), ledger)
    _queue_stream_deliveries(ledger, 1)
    assert deliverer.deliver_due() == 1  # connects (and introduces itself to Redis) once
    checks = _queue_stream_deliveries(ledger, 20)

    proxy.count = 0
    assert deliverer.deliver_due() == 20
    assert proxy.count == 1  # twenty XADDs, one round trip
    entries = client.xrange(name)
    assert {fields[b"check_id"].decode() for _, fields in entries[1:]} == set(checks)
    with ledger.session() as session:
        assert claim_due(session, 100, _lease()) == []  # every one recorded delivered, none left due

    _queue_stream_deliveries(ledger, 5)
    with ledger.session() as session:
        one_by_one = claim_due(session, 100, _lease())
    proxy.count = 0
    for row in one_by_one:  # the same sends, one delivery at a time, as before: the measure does count them
        assert deliverer.attempt(row) == "delivered"
    assert proxy.count == 5


def test_results_older_than_the_retention_leave_the_stream_as_new_ones_come(ledger, stream):
    name, client = stream
    for millisecond in range(1000, 1250):  # 250 entries from 1970: whole nodes (100 entries) of them can go
        client.xadd(name, {"old": "1"}, id=f"{millisecond}-0")
    recent = client.xadd(name, {"recent": "1"}, id=f"{int((time.time() - 3600) * 1000)}-0")  # an hour old
    deliverer = Deliverer(_settings(results_stream=name, results_stream_url=REDIS_URL), ledger)
    _queue_stream_deliveries(ledger, 1)

    assert deliverer.deliver_due() == 1

    ids = [entry_id for entry_id, _ in client.xrange(name)]
    assert b"1000-0" not in ids and b"1199-0" not in ids  # trimmed by the delivery's XADD (MINID ~)
    assert recent in ids and len(ids) <= 52  # within the 24 h kept; the newest old node may wait for the next


def test_a_delivery_refused_by_redis_is_retried_while_the_rest_of_the_pass_is_delivered(ledger, stream):
    name, client = stream
    client.set(name, "not a stream")  # every XADD to it is refused (WRONGTYPE), the pipeline itself works
    deliverer = Deliverer(_settings(results_stream=name, results_stream_url=REDIS_URL), ledger)
    _queue_stream_deliveries(ledger, 3)
    with ledger.session() as session:
        rows = claim_due(session, 100, _lease())
    assert deliverer.attempt_stream(rows) == ["retried"] * 3
    client.delete(name)
    with ledger.session() as session:
        again = claim_due(session, 100, _lease())
    assert deliverer.attempt_stream(again) == ["delivered"] * 3 and client.xlen(name) == 3


# ---------------------------------------------------------------------- keep-alive callbacks


class KeepAliveReceiver:
    """An HTTP/1.1 receiver that keeps connections open and notes which connection each request came on."""

    def __init__(self):
        self.connections: list[tuple[str, int]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.connections.append(self.client_address)
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def keep_alive_receiver() -> Iterator[KeepAliveReceiver]:
    receiver = KeepAliveReceiver()
    yield receiver
    receiver.close()


def test_callbacks_to_one_receiver_reuse_one_connection(keep_alive_receiver):
    kept = KeptConnections()
    for _ in range(5):
        assert post(keep_alive_receiver.url, b"{}", {}, timeout_s=2, policy=LOCAL, kept=kept) == 200
    assert len(keep_alive_receiver.connections) == 5 and len(set(keep_alive_receiver.connections)) == 1
    for _ in range(2):  # without a pool, as before: a connection per callback
        post(keep_alive_receiver.url, b"{}", {}, timeout_s=2, policy=LOCAL)
    assert len(set(keep_alive_receiver.connections)) == 3
    kept.close()


def test_a_kept_connection_the_receiver_closed_is_replaced(keep_alive_receiver):
    kept = KeptConnections()
    post(keep_alive_receiver.url, b"{}", {}, timeout_s=2, policy=LOCAL, kept=kept)
    [(_, (idle, _, _))] = [(key, sockets[0]) for key, sockets in kept._idle.items()]
    idle.shutdown(socket.SHUT_RDWR)  # as a receiver's idle timeout would, seen from this side
    assert post(keep_alive_receiver.url, b"{}", {}, timeout_s=2, policy=LOCAL, kept=kept) == 200
    assert len(set(keep_alive_receiver.connections)) == 2
    kept.close()


def test_a_kept_connection_is_never_a_way_around_the_address_policy(keep_alive_receiver):
    kept = KeptConnections()
    post(keep_alive_receiver.url, b"{}", {}, timeout_s=2, policy=LOCAL, kept=kept)
    with pytest.raises(FetchError) as refused:  # the same receiver, under the default policy: checked, refused
        post(keep_alive_receiver.url, b"{}", {}, timeout_s=2, kept=kept)
    assert refused.value.code == "url.refused" and len(keep_alive_receiver.connections) == 1
    kept.close()


def _lease() -> timedelta:
    return timedelta(seconds=60)
