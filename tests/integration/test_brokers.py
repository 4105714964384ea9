"""Brokers restarting under a real worker: Redis without persistence and RabbitMQ, each a server of the test's own.

The intake files every message in the ledger within milliseconds, so a broker killed 2 s after the last message
loses nothing, even one that keeps nothing on disk. The worker survives the restart and serves again at once.
"""

from __future__ import annotations

import base64
import subprocess
import time
import uuid

import pytest
import sqlalchemy as sa

from tests.conftest import encode, noise_image
from tests.integration.brokers import RabbitServer, RedisServer
from tests.integration.stack import TERMINAL, Worker, make_stack, platform_client
from worker.ledger.models import CheckRow

N = 40


@pytest.fixture(scope="module", params=["redis", "rabbitmq"])
def broker(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"broker-{request.param}")
    server = RedisServer(folder) if request.param == "redis" else RabbitServer(folder)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def stack(broker, postgres_url, tiny_store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("broker-stack")
    yield from make_stack(postgres_url, tiny_store, folder, ITEM_BROKER_URL=broker.url, ITEM_BATCH_SIZE="8")


def _send(broker_url: str, prefix: str, ids: list[str]) -> None:
    """What a platform's Celery client does: one message per upload, inline bytes, JSON."""
    data = base64.b64encode(encode(noise_image(1))).decode()
    app = platform_client(broker_url, prefix)
    with app.producer_or_acquire() as producer:
        for external_id in ids:
            app.send_task(
                "item.check",
                kwargs={"external_id": external_id, "image": {"b64": data}},
                queue="item.checks",
                producer=producer,
            )


def _wait_done(stack, ids: list[str], timeout: float = 120) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        with stack.ledger.session() as session:
            query = sa.select(CheckRow.external_id, CheckRow.status).where(CheckRow.external_id.in_(ids))
            statuses = dict(session.execute(query).tuples().all())
        if len(statuses) == len(ids) and set(statuses.values()) <= TERMINAL:
            return statuses
        if time.monotonic() > deadline:
            return statuses
        time.sleep(0.5)


def test_a_broker_killed_after_the_last_message_loses_nothing_and_the_worker_resumes(stack, broker):
    worker = Worker(stack, f"restart-{type(broker).__name__}")
    try:
        ids = [f"{type(broker).__name__}-{i}" for i in range(N)]
        _send(broker.url, stack.prefix, ids)
        time.sleep(2)
        broker.kill()  # a crash: what it kept only in memory is gone
        broker.start()
        statuses = _wait_done(stack, ids)
        assert len(statuses) == N, f"{N - len(statuses)} of {N} checks lost"
        assert set(statuses.values()) == {"done"}
        assert worker.process.poll() is None  # the worker survived the restart

        after = [f"{type(broker).__name__}-after-{i}" for i in range(3)]
        started = time.monotonic()
        _send(broker.url, stack.prefix, after)  # the intake reconnected by itself
        assert set(_wait_done(stack, after, timeout=60).values()) == {"done"}
        assert time.monotonic() - started < 60
    finally:
        worker.stop()


@pytest.fixture(scope="module")
def vhost():
    """A vhost of this module's own on the machine's RabbitMQ, deleted afterwards."""
    name = f"item-test-{uuid.uuid4().hex[:10]}"
    subprocess.run(["rabbitmqctl", "add_vhost", name], check=True, capture_output=True, timeout=60)
    subprocess.run(
        ["rabbitmqctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    yield f"amqp://guest:guest@127.0.0.1:5672/{name}"
    subprocess.run(["rabbitmqctl", "delete_vhost", name], capture_output=True, timeout=60)


def test_the_machines_rabbitmq_in_a_vhost_of_its_own(vhost, postgres_url, tiny_store, tmp_path):
    for stack in make_stack(postgres_url, tiny_store, tmp_path, ITEM_BROKER_URL=vhost):
        worker = Worker(stack, "vhost")
        try:
            ids = [f"vhost-{i}" for i in range(5)]
            _send(vhost, "", ids)
            assert set(_wait_done(stack, ids, timeout=60).values()) == {"done"}
        finally:
            worker.stop()
