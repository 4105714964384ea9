"""Result delivery on a real ledger (both databases), a real Redis and a real HTTP receiver on 127.0.0.1.

The receiver is a small threaded server this module runs, scripted per test (answer 500 twice then 200, hang
until released...). Checks go through the real `CheckService` with the tiny detector, so their deliveries are
queued exactly where production queues them; `Deliverer.deliver_due` is driven by hand unless a test is about
the deliverer's thread. Backoff is a few milliseconds, so retries come due at once.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa
from prometheus_client import REGISTRY
from typer.testing import CliRunner

from tests.conftest import encode, noise_image, random_head
from tests.integration.stack import REDIS_URL
from worker.gpu.batches import CheckService
from worker.gpu.embedded import InProcess
from worker.intake.filing import CheckRequest
from worker.ledger.models import CheckRow, DeliveryRow
from worker.ledger.outbox import record_outcome
from worker.ledger.store import Lease, Ledger
from worker.ledger.views import check_dict
from worker.outbox.callbacks import CallbackError, checked_callback_url
from worker.outbox.delivery import Deliverer
from worker.outbox.signing import verify
from worker.settings import Settings

SECRET = "callback-secret-for-tests"
FAST = {
    "batch_max_wait_s": 0,
    "database_url": "sqlite://",  # unused: the service is given the test's ledger
    "callback_secret": SECRET,
    "callback_allowed_networks": ["127.0.0.1/32"],
    "callback_timeout_s": 2,
    "delivery_backoff_s": 0.001,
    "delivery_backoff_max_s": 0.002,
    "delivery_max_attempts": 3,
    "delivery_poll_s": 0.05,
}


# ---------------------------------------------------------------------- a platform's receiver


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A callback endpoint: records every POST, answers `statuses` in turn (the last one from then on).

    With `hang`, each request is held until `release` is set, as a receiver that stopped answering would.
    """

    def __init__(self, statuses: tuple[int, ...] = (200,), hang: bool = False, delay_s: float = 0.0):
        self.statuses, self.hang, self.delay_s = statuses, hang, delay_s
        self.requests: list[Received] = []
        self.answered = 0
        self.release = threading.Event()
        self._arrived = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=t0ken"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._arrived:
                    index = len(receiver.requests)
                    receiver.requests.append(Received(self.path, dict(self.headers.items()), body))
                    receiver._arrived.notify_all()
                if receiver.hang:
                    receiver.release.wait(30)
                time.sleep(receiver.delay_s)
                status = receiver.statuses[min(index, len(receiver.statuses) - 1)]
                answer = b"receiver down" if status >= 500 else b"ok"
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)
                receiver.answered += 1

            def log_message(self, *args) -> None:
                pass

        return Handler

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.requests) >= count, timeout):
                pytest.fail(f"the receiver got {len(self.requests)} requests, not {count}, in {timeout}s")
            return list(self.requests)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers() -> Iterator[Callable[..., Receiver]]:
    made: list[Receiver] = []

    def make(*statuses: int, hang: bool = False, delay_s: float = 0.0) -> Receiver:
        made.append(Receiver(statuses or (200,), hang, delay_s))
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


# ---------------------------------------------------------------------- the service and its outbox


@pytest.fixture
def make_service(ledger, tiny_detector, tmp_path) -> Callable[..., CheckService]:
    def make(**overrides) -> CheckService:
        settings = Settings(**{**FAST, "allowed_path_roots": [tmp_path], **overrides})
        return InProcess(settings, CheckService(settings, ledger, tiny_detector)).service

    return make


def _check(service: CheckService, folder, seed: int, callback_url: str | None = None, data: bytes | None = None):
    """Runs one check to its end through the service; returns its row."""
    path = folder / f"{seed}.png"
    path.write_bytes(encode(noise_image(seed)) if data is None else data)
    InProcess(service.settings, service).intake.file([CheckRequest(f"ext-{seed}", {"path": str(path)}, callback_url)])
    _run_one_batch(service)
    with service.ledger.session() as session:
        return service.ledger.find_check(session, f"ext-{seed}", service.version_id)


def _run_one_batch(service: CheckService) -> None:
    """A worker's turn: claims what is ready and runs it (retries scheduled for later stay queued)."""
    lease = Lease.new("test:1", 60)
    batch = service.claim_batch(lease)
    if batch:
        service.run_batch(batch, lease)


def _ended(service: CheckService, callback_url: str | None, external_id: str = "ended") -> CheckRow:
    """A check ended in the ledger without running the models (as a refused URL ends one), deliveries queued."""
    ledger = service.ledger
    with ledger.session() as session:
        check, _ = ledger.create_check(
            session,
            external_id=external_id,
            pipeline_version_id=service.version_id,
            source={"url": "http://example.com/x.png"},
            callback_url=callback_url,
        )
        row = ledger.finish_rejected(session, check.id, "url.http_4xx", "gone")
        record_outcome(session, row, results_stream=bool(service.settings.results_stream))
    return row


def _deliveries(ledger: Ledger, check_id: str | None = None) -> list[DeliveryRow]:
    query = sa.select(DeliveryRow).order_by(DeliveryRow.created_at, DeliveryRow.target)
    if check_id is not None:
        query = query.where(DeliveryRow.check_id == check_id)
    with ledger.session() as session:
        return list(session.scalars(query.execution_options(populate_existing=True)))


def _get_check(ledger: Ledger, check_id: str) -> CheckRow:
    with ledger.session() as session:
        return ledger.get_check(session, check_id)


def _until(condition: Callable[[], bool], timeout: float = 10.0, step: Callable[[], object] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not true within {timeout}s")
        if step is not None:
            step()
        time.sleep(0.01)


def _counted(outcome: str, kind: str = "callback") -> float:
    return REGISTRY.get_sample_value("item_deliveries_total", {"target": kind, "outcome": outcome}) or 0.0


def _expected_body(ledger: Ledger, check_id: str) -> dict:
    return json.loads(json.dumps({"event": "check.finished", "check": check_dict(_get_check(ledger, check_id))}))


# ---------------------------------------------------------------------- callbacks


def test_a_finished_check_is_posted_once_signed(make_service, receivers, tmp_path, ledger):
    receiver = receivers()
    service = make_service()
    check = _check(service, tmp_path, 1, callback_url=receiver.url)
    assert check.status == "done"
    [delivery] = _deliveries(ledger, check.id)
    assert delivery.status == "pending" and delivery.target == receiver.url

    deliverer = Deliverer(service.settings, ledger)
    assert deliverer.deliver_due() == 1
    assert deliverer.deliver_due() == 0  # delivered: never sent again

    [request] = receiver.wait_for(1)
    assert len(receiver.requests) == 1
    assert request.path == "/hook?token=t0ken"
    headers = request.headers
    assert headers["Content-Type"] == "application/json" and headers["User-Agent"].startswith("item-moderation/")
    assert headers["X-Item-Delivery"] == delivery.id
    timestamp, signature = headers["X-Item-Timestamp"], headers["X-Item-Signature"]
    assert verify(SECRET, request.body, timestamp, signature)
    assert not verify("not-the-secret", request.body, timestamp, signature)
    assert json.loads(request.body) == _expected_body(ledger, check.id)
    assert json.loads(request.body)["check"]["status"] == "done"
    [delivery] = _deliveries(ledger, check.id)
    assert delivery.status == "delivered" and delivery.attempts == 1 and delivery.delivered_at is not None


def test_receiver_errors_are_retried_until_delivered(make_service, receivers, tmp_path, ledger):
    receiver = receivers(500, 500, 200)
    service = make_service(delivery_max_attempts=5)
    check = _check(service, tmp_path, 2, callback_url=receiver.url)
    deliverer = Deliverer(service.settings, ledger)
    retried_before = _counted("retried")

    _until(lambda: _deliveries(ledger, check.id)[0].status == "delivered", step=deliverer.deliver_due)

    [delivery] = _deliveries(ledger, check.id)
    assert delivery.attempts == 3 and delivery.last_error is None
    requests = receiver.wait_for(3)
    assert len(requests) == 3
    assert {r.headers["X-Item-Delivery"] for r in requests} == {delivery.id}  # the receiver's idempotency key
    assert {r.body for r in requests} == {requests[0].body}  # the same bytes every time
    assert all(verify(SECRET, r.body, r.headers["X-Item-Timestamp"], r.headers["X-Item-Signature"]) for r in requests)
    assert _counted("retried") - retried_before == 2


def test_a_receiver_that_keeps_failing_ends_failed_and_the_check_stays_done(make_service, receivers, tmp_path, ledger):
    receiver = receivers(500)
    service = make_service(delivery_max_attempts=3)
    check = _check(service, tmp_path, 3, callback_url=receiver.url)
    deliverer = Deliverer(service.settings, ledger)

    _until(lambda: _deliveries(ledger, check.id)[0].status == "failed", step=deliverer.deliver_due)

    [delivery] = _deliveries(ledger, check.id)
    assert delivery.attempts == 3 and len(receiver.requests) == 3
    assert delivery.last_error.startswith("url.http_5xx: ") and "HTTP 500" in delivery.last_error
    assert "receiver down" in delivery.last_error  # what the receiver said
    assert "t0ken" not in delivery.last_error  # the URL's query stays out of errors
    assert deliverer.deliver_due() == 0 and len(receiver.requests) == 3
    assert _get_check(ledger, check.id).status == "done"


def test_a_redirect_is_not_followed(make_service, receivers, ledger):
    receiver = receivers(302)
    service = make_service()
    check = _ended(service, receiver.url)
    Deliverer(service.settings, ledger).deliver_due()
    [delivery] = _deliveries(ledger, check.id)
    assert delivery.status == "pending" and delivery.last_error.startswith("url.http_status: ")
    assert [r.path for r in receiver.requests] == ["/hook?token=t0ken"]  # /elsewhere never asked


def test_a_hanging_receiver_times_out_and_is_retried(make_service, receivers, ledger):
    receiver = receivers(hang=True)
    service = make_service(callback_timeout_s=0.3)
    check = _ended(service, receiver.url)
    Deliverer(service.settings, ledger).deliver_due()
    [delivery] = _deliveries(ledger, check.id)
    assert delivery.status == "pending" and delivery.attempts == 1
    assert delivery.last_error.startswith("url.timeout: ")


def test_callbacks_to_refused_addresses_fail_at_once_unsent(make_service, receivers, ledger):
    receiver = receivers()
    service = make_service(callback_allowed_networks=[])  # loopback is refused like any private address
    loopback = _ended(service, receiver.url, "loopback")
    private = _ended(service, "http://10.0.0.1/hook", "private")
    Deliverer(service.settings, ledger).deliver_due()
    for check in (loopback, private):
        [delivery] = _deliveries(ledger, check.id)
        assert delivery.status == "failed" and delivery.attempts == 1
        assert delivery.last_error.startswith("url.refused: ")
    assert receiver.requests == []


def test_without_a_secret_callbacks_fail_unsent(make_service, receivers, ledger):
    receiver = receivers()
    service = make_service(callback_secret=None)
    check = _ended(service, receiver.url)
    Deliverer(service.settings, ledger).deliver_due()
    [delivery] = _deliveries(ledger, check.id)
    assert delivery.status == "failed" and delivery.last_error.startswith("callback.no_secret: ")
    assert receiver.requests == []


def test_rejected_checks_are_delivered_too(make_service, receivers, tmp_path, ledger):
    receiver = receivers()
    service = make_service()
    check = _check(service, tmp_path, 9, callback_url=receiver.url, data=b"<html>not an image</html>")
    assert check.status == "rejected"
    Deliverer(service.settings, ledger).deliver_due()
    [request] = receiver.wait_for(1)
    body = json.loads(request.body)
    assert body == _expected_body(ledger, check.id)
    assert body["check"]["status"] == "rejected" and body["check"]["error_code"] == check.error_code


def test_an_invalid_callback_url_rejects_the_check(make_service, tmp_path, ledger):
    service = make_service()
    check = _check(service, tmp_path, 10, callback_url="ftp://example.com/hook")
    assert check.status == "rejected" and check.error_code == "callback.invalid"
    assert _deliveries(ledger) == []


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("ftp://example.com/hook", "Only http and https"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("https:///hook", "no host"),
        ("https://example.com/a b", "whitespace"),
        ("https://example.com/" + "a" * 2048, "limit is 2,048"),
        ("", "non-empty"),
    ],
)
def test_callback_url_shape_checks(url, problem):
    with pytest.raises(CallbackError, match=problem) as raised:
        checked_callback_url(url)
    assert raised.value.code == "callback.invalid" and raised.value.permanent
    assert checked_callback_url(None) is None
    assert checked_callback_url("https://platform.example/hooks/item?k=1") == "https://platform.example/hooks/item?k=1"


# ---------------------------------------------------------------------- the results stream


def test_the_results_stream_gets_one_entry_per_check(make_service, receivers, stream, tmp_path, ledger):
    name, client = stream
    receiver = receivers()
    service = make_service(results_stream=name, results_stream_url=REDIS_URL)
    done = _check(service, tmp_path, 11, callback_url=receiver.url)
    rejected = _check(service, tmp_path, 12, data=b"")
    assert (done.status, rejected.status) == ("done", "rejected")

    Deliverer(service.settings, ledger).deliver_all_due()

    entries = client.xrange(name)
    assert len(entries) == 2
    by_check = {fields[b"check_id"].decode(): fields for _, fields in entries}
    assert set(by_check) == {done.id, rejected.id}
    for check in (done, rejected):
        fields = by_check[check.id]
        assert fields[b"external_id"].decode() == check.external_id
        assert json.loads(fields[b"body"]) == _expected_body(ledger, check.id)
        [delivery] = [d for d in _deliveries(ledger, check.id) if d.target == "stream"]
        assert delivery.status == "delivered" and fields[b"delivery_id"].decode() == delivery.id
    assert len(receiver.wait_for(1)) == 1  # the callback went out beside the stream entry
    assert {d.status for d in _deliveries(ledger)} == {"delivered"} and len(_deliveries(ledger)) == 3


# ---------------------------------------------------------------------- never blocking, never twice


def test_a_hanging_receiver_does_not_hold_up_other_checks(make_service, receivers, tmp_path, ledger):
    receiver = receivers(hang=True)
    service = make_service(callback_timeout_s=30)
    deliverer = Deliverer(service.settings, ledger)
    deliverer.start()
    try:
        first = _check(service, tmp_path, 13, callback_url=receiver.url)
        receiver.wait_for(1)  # the deliverer's thread is now inside a POST the receiver does not answer
        started = time.monotonic()
        second = _check(service, tmp_path, 14)
        assert second.status == "done"
        assert time.monotonic() - started < service.settings.callback_timeout_s  # a limit, not a speed claim
        [delivery] = _deliveries(ledger, first.id)
        assert delivery.status == "pending" and delivery.last_error is None and receiver.answered == 0  # in flight
        receiver.release.set()
        _until(lambda: _deliveries(ledger, first.id)[0].status == "delivered")
    finally:
        deliverer.stop(timeout=10)
    assert len(receiver.requests) == 1


def test_two_deliverers_never_send_the_same_delivery_twice(make_service, receivers, ledger):
    receiver = receivers(delay_s=0.002)
    service = make_service()
    for i in range(40):  # forty ended checks, each with a callback due
        _ended(service, receiver.url, f"many-{i}")
    deliverers = [Deliverer(service.settings, ledger) for _ in range(2)]
    start = threading.Barrier(len(deliverers))

    def drain(deliverer: Deliverer) -> None:
        start.wait()
        while deliverer.deliver_due(limit=3):
            pass

    threads = [threading.Thread(target=drain, args=(deliverer,)) for deliverer in deliverers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    sent = Counter(request.headers["X-Item-Delivery"] for request in receiver.requests)
    rows = _deliveries(ledger)
    assert len(rows) == 40 and {row.status for row in rows} == {"delivered"}
    assert set(sent) == {row.id for row in rows}
    assert max(sent.values()) == 1, [delivery for delivery, n in sent.items() if n > 1]
    assert {row.attempts for row in rows} == {1}


def test_a_stopping_deliverer_hands_back_what_it_has_not_sent(make_service, receivers, ledger):
    receiver = receivers()
    service = make_service()
    check = _ended(service, receiver.url)
    stopping = Deliverer(service.settings, ledger)
    stopping.stop()  # as at worker shutdown, with a pass still claiming
    assert stopping.deliver_due() == 1
    [delivery] = _deliveries(ledger, check.id)
    assert delivery.status == "pending" and delivery.attempts == 0 and receiver.requests == []
    assert Deliverer(service.settings, ledger).deliver_due() == 1  # due at once for another process, not leased
    assert _deliveries(ledger, check.id)[0].status == "delivered" and len(receiver.requests) == 1


def test_the_thread_survives_an_unreachable_ledger(caplog):
    settings = Settings(**{**FAST, "delivery_poll_s": 0.02})
    ledger = Ledger("postgresql+psycopg://postgres@127.0.0.1:9/nowhere?connect_timeout=1")
    deliverer = Deliverer(settings, ledger)
    deliverer.start()
    try:
        time.sleep(0.3)  # several passes, each failing to connect
        assert deliverer._thread.is_alive()
    finally:
        deliverer.stop(timeout=10)
        ledger.dispose()
    assert not deliverer._thread.is_alive()
    failures = [record for record in caplog.records if record.name == "item.delivery"]
    assert len(failures) == 1 and "delivery pass failed" in failures[0].message  # logged once, not every pass


def test_embedded_mode_delivers_what_is_due_and_leaves_later_retries(receivers, tiny_store, tiny_detector, tmp_path):
    """No broker: `submit` runs the checks here, then sends their results before it returns."""
    from worker.gpu import embedded
    from worker.intake import client
    from worker.ledger import migrate

    receiver = receivers(500, 200)  # the first result is refused, the second accepted
    database_url = f"sqlite:///{tmp_path / 'embedded.sqlite3'}"
    migrate.upgrade(database_url)
    settings = Settings(
        **{
            **FAST,
            "delivery_backoff_s": 60,
            "delivery_backoff_max_s": 60,
            "database_url": database_url,
            "profile": "tiny",
            "model_dir": tiny_store.model_dir,
            "allow_download": False,
            "device": "cpu",
            "head": random_head(tiny_detector).save(tmp_path / "head.safetensors"),
        }
    )
    images = []
    for seed in (21, 22):
        (tmp_path / f"{seed}.png").write_bytes(encode(noise_image(seed)))
        images.append((f"embedded-{seed}", client.image_from(str(tmp_path / f"{seed}.png"))))

    embedded.submit_in_process(settings, images, callback_url=receiver.url)

    assert len(receiver.requests) == 2  # sent before submit returned; the retry, due in a minute, not waited for
    ledger = Ledger(database_url)
    rows = sorted(_deliveries(ledger), key=lambda row: row.status)
    ledger.dispose()
    assert [(row.status, row.attempts) for row in rows] == [("delivered", 1), ("pending", 1)]
    assert rows[1].last_error.startswith("url.http_5xx: ")


# ---------------------------------------------------------------------- item deliveries


def test_item_deliveries_lists_and_retries_failed_ones(make_service, receivers, ledger):
    from worker.cli.main import app

    receiver = receivers()
    failing = make_service(callback_secret=None)
    check = _ended(failing, receiver.url)
    Deliverer(failing.settings, ledger).deliver_due()
    env = {"ITEM_DATABASE_URL": ledger.engine.url.render_as_string(hide_password=False), "COLUMNS": "250"}
    runner = CliRunner()

    listed = runner.invoke(app, ["deliveries", "list", "--status", "failed", "--json"], env=env)
    assert listed.exit_code == 0, listed.output
    [row] = [json.loads(line) for line in listed.stdout.splitlines()]
    assert row["check_id"] == check.id and row["kind"] == "callback" and row["status"] == "failed"
    assert row["target"] == receiver.url.split("?")[0] and row["last_error"].startswith("callback.no_secret")
    table = runner.invoke(app, ["deliveries", "list"], env=env)
    assert table.exit_code == 0 and "callback.no_secret" in table.stdout and "t0ken" not in table.stdout

    assert runner.invoke(app, ["deliveries", "retry"], env=env).exit_code == 2
    assert runner.invoke(app, ["deliveries", "list", "--status", "lost"], env=env).exit_code == 2
    unknown = runner.invoke(app, ["deliveries", "retry", "no-such-id"], env=env)
    assert unknown.exit_code == 1 and "0 deliveries" in unknown.stdout

    retried = runner.invoke(app, ["deliveries", "retry", "--all-failed"], env=env)
    assert retried.exit_code == 0 and "1 deliveries" in retried.stdout
    [delivery] = _deliveries(ledger, check.id)
    assert delivery.status == "pending" and delivery.attempts == 0
    Deliverer(make_service().settings, ledger).deliver_due()  # the secret is set now
    assert _deliveries(ledger, check.id)[0].status == "delivered" and len(receiver.wait_for(1)) == 1
