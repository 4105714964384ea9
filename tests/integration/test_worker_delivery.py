"""Result delivery through a real `item worker`: `item submit --callback-url` → a signed POST and a stream entry.

The worker's deliverer thread sends from the outbox; the receiver is a local server on 127.0.0.1, which the
worker is allowed to call through ITEM_CALLBACK_ALLOWED_NETWORKS, and the results stream has a name of its own.
"""

from __future__ import annotations

import json
import time
import uuid

import pytest
import sqlalchemy as sa

from tests.integration.stack import Worker, make_stack
from tests.integration.test_delivery import Receiver
from worker.ledger.models import DeliveryRow
from worker.ledger.views import check_dict
from worker.outbox.signing import verify

SECRET = "end-to-end-secret"
STREAM = f"item-test-results-{uuid.uuid4().hex}"


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    overrides = {
        "ITEM_CALLBACK_SECRET": SECRET,
        "ITEM_CALLBACK_ALLOWED_NETWORKS": '["127.0.0.1/32"]',
        "ITEM_DELIVERY_POLL_S": "0.2",
        "ITEM_RESULTS_STREAM": STREAM,
    }
    for stack in make_stack(postgres_url, tiny_store, tmp_path_factory.mktemp("delivery"), **overrides):
        yield stack
        stack.redis.delete(STREAM)  # not under the run's key prefix: the stream name is used as given


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


def test_a_worker_posts_the_result_signed_and_adds_it_to_the_stream(stack, receiver):
    worker = Worker(stack, "worker")
    try:
        [submitted] = stack.submit("--callback-url", receiver.url, str(stack.image(1)))
        check_id = submitted["check_id"]
        row = stack.wait_terminal([check_id])[check_id]
        assert row.status == "done", (row.error_code, row.error_message)

        [request] = receiver.wait_for(1, timeout=30)
        headers = request.headers
        assert verify(SECRET, request.body, headers["X-Item-Timestamp"], headers["X-Item-Signature"])
        assert not verify("wrong-secret", request.body, headers["X-Item-Timestamp"], headers["X-Item-Signature"])
        expected = json.loads(json.dumps({"event": "check.finished", "check": check_dict(row)}))
        assert json.loads(request.body) == expected

        entries = _stream_entries(stack, 1, timeout=30)
        assert entries[0][b"check_id"].decode() == check_id
        assert json.loads(entries[0][b"body"]) == expected
        _wait_delivered(stack, check_id, count=2, timeout=30)  # the callback and the stream, both recorded
    finally:
        worker.stop()
    assert len(receiver.requests) == 1


def _stream_entries(stack, count: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while len(entries := stack.redis.xrange(STREAM)) < count:
        if time.monotonic() > deadline:
            pytest.fail(f"{len(entries)} stream entries, not {count}, within {timeout}s")
        time.sleep(0.1)
    return [fields for _, fields in entries]


def _wait_delivered(stack, check_id: str, count: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    query = sa.select(DeliveryRow.status).where(DeliveryRow.check_id == check_id)
    while True:
        with stack.ledger.session() as session:
            statuses = list(session.scalars(query))
        if statuses == ["delivered"] * count:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"deliveries of {check_id} are {statuses} after {timeout}s")
        time.sleep(0.1)
