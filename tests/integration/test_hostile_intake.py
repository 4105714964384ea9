"""No message stops the intake: a real worker on Redis and on RabbitMQ is sent a few hundred hostile messages
(tests/integration/hostile.py) interleaved with good checks. Every good check is done, every hostile message is
exactly one check row (rejected, or whatever its own fate) or one dead letter, nothing is left running, and the
worker still serves afterwards. The large run (10,000 messages) is tests/bench/bench_hostile.py."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid

import pytest
import sqlalchemy as sa
from kombu import Connection

from tests.conftest import encode, noise_image
from tests.integration.hostile import HostileTraffic
from tests.integration.stack import Worker, make_stack
from worker.intake.broker import check_queue
from worker.ledger.models import CheckRow, DeadLetterRow

HOSTILE = 300
GOOD = 12
MAX_B64 = 64 * 1024


@pytest.fixture(scope="module")
def vhost():
    name = f"item-hostile-{uuid.uuid4().hex[:8]}"
    subprocess.run(["rabbitmqctl", "add_vhost", name], check=True, capture_output=True, timeout=60)
    subprocess.run(["rabbitmqctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"], check=True,
                   capture_output=True, timeout=60)  # fmt: skip
    yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)


@pytest.fixture(params=["redis", "rabbitmq"])
def stack(request, postgres_url, tiny_store, tmp_path):
    overrides = {"ITEM_MAX_B64_BYTES": str(MAX_B64), "ITEM_FETCH_TIMEOUT_S": "2", "ITEM_MAX_ATTEMPTS": "2"}
    if request.param == "rabbitmq":
        overrides["ITEM_BROKER_URL"] = request.getfixturevalue("vhost")
    for stack in make_stack(postgres_url, tiny_store, tmp_path, **overrides):
        with stack.ledger.session() as session:  # the module's database: only this run's rows count
            session.execute(sa.delete(DeadLetterRow))
        stack.kind = request.param
        yield stack


def test_no_message_stops_the_intake(stack):
    worker = Worker(stack, f"hostile-{stack.kind}")
    try:
        good, hostile = send_hostile_traffic(stack, seed=23, hostile=HOSTILE, good=GOOD)
        outcome = wait_for_every_message(stack, good, hostile, timeout_s=240)
        assert outcome["good_done"] == GOOD, outcome
        assert outcome["rows"] + outcome["dead_letters"] == len(hostile), outcome
        assert outcome["unfinished"] == 0, outcome
        # and the worker still serves: one more good check is done
        late = send_good(stack, ["late-good"])
        assert wait_for_every_message(stack, late, [], timeout_s=60)["good_done"] == 1
        assert worker.process.poll() is None  # alive, and none of its threads died on the way
        assert "thread item-" not in worker.log.read_text() and "exited with status" not in worker.log.read_text()
    finally:
        worker.stop()


# ---------------------------------------------------------------------- shared with tests/bench/bench_hostile.py


def send_hostile_traffic(stack, *, seed: int, hostile: int, good: int) -> tuple[list[str], list]:
    """Sends `hostile` hostile messages with `good` good checks spread among them; returns their external ids
    and the hostile messages."""
    traffic = HostileTraffic(seed, redis=stack.kind == "redis", max_bytes=MAX_B64, tag=hostile_tag(stack))
    messages = traffic.messages(hostile)
    good_ids = [f"good-{seed}-{i}" for i in range(good)]
    every = max(1, hostile // max(1, good))
    with _producer(stack) as publish:
        for index, message in enumerate(messages):
            publish(message)
            if index % every == 0 and index // every < good:
                publish_good(stack, publish, good_ids[index // every], index)
        for i in range(min(good, hostile // every + 1), good):
            publish_good(stack, publish, good_ids[i], i)
    return good_ids, messages


def send_good(stack, external_ids: list[str]) -> list[str]:
    with _producer(stack) as publish:
        for i, external_id in enumerate(external_ids):
            publish_good(stack, publish, external_id, 10_000 + i)
    return external_ids


def publish_good(stack, publish, external_id: str, seed: int) -> None:
    image = base64.b64encode(encode(noise_image(seed, 48, 48), "PNG")).decode()
    kwargs = {"external_id": external_id, "image": {"b64": image}}
    body = json.dumps([[], kwargs, {"callbacks": None, "errbacks": None}]).encode()
    from tests.integration.hostile import Hostile

    publish(Hostile("good", body=body, headers={"task": "item.check", "id": str(uuid.uuid4()), "lang": "py"}))


class _producer:
    """Publishes `Hostile` messages: LPUSH of their bytes on Redis, a raw AMQP publish on RabbitMQ."""

    def __init__(self, stack):
        self.stack = stack

    def __enter__(self):
        if self.stack.kind == "redis":
            key = f"{self.stack.prefix}item.checks"
            pipe = self.stack.redis.pipeline(transaction=False)
            self._flush = pipe.execute
            return lambda message: pipe.lpush(key, message.redis_bytes())
        self._connection = Connection(self.stack.env["ITEM_BROKER_URL"])
        producer = self._connection.Producer()
        queue = check_queue()

        def publish(message) -> None:
            headers = {k: v for k, v in message.headers.items() if _amqp_safe(k) and _amqp_safe(v)}
            producer.publish(
                message.body, routing_key="item.checks", exchange=queue.exchange, declare=[queue],
                content_type=message.content_type, content_encoding=message.content_encoding, headers=headers,
            )  # fmt: skip

        self._flush = lambda: None
        return publish

    def __exit__(self, *exc) -> None:
        self._flush()
        if self.stack.kind != "redis":
            self._connection.release()


def _amqp_safe(value) -> bool:
    """What a client library can put in an AMQP header table at all: no lone surrogates, integers within 64
    bits, no floats (py-amqp writes them as decimals it cannot always encode), nested as deep as it likes."""
    if isinstance(value, dict):
        return all(_amqp_safe(k) and _amqp_safe(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return all(_amqp_safe(v) for v in value)
    if isinstance(value, str):
        return "\x00" not in value and value.encode("utf-8", "surrogatepass") == value.encode("utf-8", "ignore")
    if isinstance(value, bool) or value is None:
        return True
    return isinstance(value, int) and -(2**63) <= value < 2**63


def wait_for_every_message(stack, good: list[str], hostile: list, *, timeout_s: float) -> dict:
    """Waits until every good check is terminal and every hostile message is a row or a dead letter, with
    nothing left queued or running; returns the counts (the last ones seen, at the deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        outcome = _outcome(stack, good)
        settled = outcome["good_terminal"] == len(good) and outcome["unfinished"] == 0
        if settled and outcome["rows"] + outcome["dead_letters"] >= len(hostile):
            return outcome
        if time.monotonic() > deadline:
            return outcome
        time.sleep(0.5)


def hostile_tag(stack) -> str:
    return f"h{stack.kind}{id(stack)}-"


def _outcome(stack, good: list[str]) -> dict:
    with stack.ledger.session() as session:
        good_rows = session.execute(
            sa.select(CheckRow.status, sa.func.count()).where(CheckRow.external_id.in_(good)).group_by(CheckRow.status)
        ).all()
        mine = CheckRow.external_id.startswith(hostile_tag(stack), autoescape=True)
        hostile_rows = session.scalar(sa.select(sa.func.count()).where(mine))
        unfinished = session.scalar(sa.select(sa.func.count()).where(CheckRow.status.in_(["queued", "running"]), mine))
        codes = session.execute(sa.select(DeadLetterRow.code, sa.func.count()).group_by(DeadLetterRow.code)).all()
    by_status = {str(getattr(status, "value", status)): n for status, n in good_rows}
    return {
        "good_done": by_status.get("done", 0),
        "good_terminal": sum(by_status.get(s, 0) for s in ("done", "rejected", "failed")),
        "rows": hostile_rows,
        "unfinished": unfinished,
        "dead_letters": sum(n for _, n in codes),
        "dead_letter_codes": dict(codes),
    }
