"""Each tenant's intake queue, on the machine's Redis and a real `item worker`: a message is filed as the tenant
whose queue it came on, whatever its body, headers or envelope claim; a tenant added while the worker runs has
its queue consumed without a restart; a disabled or vanished tenant's messages become dead letters. And the Redis
take of several queues keeps what it takes when its consumer dies, and puts a message back where it was taken."""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import time
import uuid

import pytest
import redis
import sqlalchemy as sa
from kombu import Connection

from tests.conftest import encode, noise_image
from tests.integration.conftest import take_connection
from tests.integration.stack import REDIS_URL, Worker, celery_json_message, make_stack, platform_client
from worker.intake.queues import queue_name, tenant_of_queue, tenant_queue
from worker.ledger.models import CheckRow, DeadLetterRow, TenantRow
from worker.ledger.tenants import create_tenant, set_disabled

PNG = base64.b64encode(encode(noise_image(5, 32, 32))).decode()


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    folder = tmp_path_factory.mktemp("tenant-queues")
    yield from make_stack(postgres_url, tiny_store, folder, ITEM_TENANT_REFRESH_S="0.5")


@pytest.fixture(scope="module")
def worker(stack):
    with stack.ledger.session() as session:
        for tenant_id in ("acme", "bravo", "dormant", "gone"):
            create_tenant(session, tenant_id)
    process = Worker(stack, "tenants", concurrency=0)  # the intake alone: filing is what is tested
    process.wait_for(r"intake consuming item\.checks\.gone", 30)
    yield process
    process.stop()


def _send(stack, tenant_id: str, external_id: str) -> None:
    """As the tenant's Celery client sends (README): its own queue, exchange and routing key."""
    platform_client(stack.env["ITEM_BROKER_URL"], stack.prefix).send_task(
        "item.check", kwargs={"external_id": external_id, "image": {"b64": PNG}}, queue=queue_name(tenant_id)
    )


def _wait(stack, model, **where):
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with stack.ledger.session() as session:
            rows = session.scalars(sa.select(model).filter_by(**where)).all()
        if rows:
            return rows
        time.sleep(0.05)
    pytest.fail(f"no {model.__name__} with {where} within 20 s")


def _letters(stack, external_id: str) -> list[DeadLetterRow]:
    """The dead letters keeping `external_id` in their body."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with stack.ledger.session() as session:
            letters = session.scalars(sa.select(DeadLetterRow).where(DeadLetterRow.body.contains(external_id))).all()
        if letters:
            return letters
        time.sleep(0.05)
    pytest.fail(f"no dead letter for {external_id} within 20 s")


def test_a_message_is_its_queues_tenants_whatever_it_claims(stack, worker):
    _send(stack, "acme", "claims-1")
    _send(stack, "default", "claims-default")
    forged = celery_json_message({"external_id": "claims-forged", "image": {"b64": PNG}})
    forged["headers"].update(tenant="bravo", tenant_id="bravo")
    forged["properties"]["delivery_info"] = {"exchange": "item.checks.bravo", "routing_key": "item.checks.bravo",
                                             "consumer_tag": "1"}  # fmt: skip
    stack.redis.lpush(f"{stack.prefix}item.checks.acme", json.dumps(forged))
    asking = celery_json_message({"external_id": "claims-argument", "image": {"b64": PNG}, "tenant_id": "bravo"})
    stack.redis.lpush(f"{stack.prefix}item.checks.acme", json.dumps(asking))

    assert [row.tenant_id for row in _wait(stack, CheckRow, external_id="claims-1")] == ["acme"]
    assert [row.tenant_id for row in _wait(stack, CheckRow, external_id="claims-default")] == ["default"]
    assert [row.tenant_id for row in _wait(stack, CheckRow, external_id="claims-forged")] == ["acme"]
    [asked] = _wait(stack, CheckRow, external_id="claims-argument")  # no such argument: rejected, as acme's
    assert (asked.tenant_id, asked.status, asked.error_code) == ("acme", "rejected", "message.invalid")


def test_a_tenant_added_while_the_worker_runs_has_its_queue_consumed(stack, worker):
    with stack.ledger.session() as session:
        create_tenant(session, "late")
    _send(stack, "late", "late-1")  # waits in the list until the intake reads the tenant (ITEM_TENANT_REFRESH_S)
    assert [row.tenant_id for row in _wait(stack, CheckRow, external_id="late-1")] == ["late"]


def test_a_disabled_or_vanished_tenants_messages_become_dead_letters(stack, worker):
    with stack.ledger.session() as session:
        set_disabled(session, "dormant", True)
        session.execute(sa.delete(TenantRow).where(TenantRow.id == "gone"))
    _send(stack, "dormant", "dormant-1")
    _send(stack, "gone", "gone-1")
    [disabled] = _letters(stack, "dormant-1")
    [unknown] = _letters(stack, "gone-1")
    assert (disabled.code, disabled.tenant_id) == ("tenant.disabled", "dormant")
    assert (unknown.code, unknown.tenant_id) == ("tenant.unknown", None)
    with stack.ledger.session() as session:
        assert not session.scalars(sa.select(CheckRow).where(CheckRow.external_id.in_(["dormant-1", "gone-1"]))).all()


# ---------------------------------------------------------------------- the Redis take of several queues


def _consuming(connection: Connection, tenants: list[str], received: list):
    channel = connection.channel()
    for tenant_id in tenants:
        tenant_queue(tenant_id)(channel).declare()
        channel.basic_consume(queue_name(tenant_id), False, received.append, consumer_tag=uuid.uuid4().hex)
    return channel


def test_a_take_of_several_queues_keeps_what_a_dying_consumer_took_and_puts_back_where_it_was(prefix):
    raw = redis.Redis.from_url(REDIS_URL)
    forged = celery_json_message({"external_id": "x"})
    forged["properties"]["delivery_info"] = {"exchange": "", "routing_key": "item.checks.bravo"}
    raw.lpush(f"{prefix}item.checks.acme", json.dumps(forged))

    doomed_connection = take_connection(prefix)
    doomed = _consuming(doomed_connection, ["default", "acme", "bravo"], [])
    doomed_connection.transport.cycle._register_BRPOP(doomed)  # one script looks at all three queues
    doomed.client.connection._sock.shutdown(socket.SHUT_RDWR)  # and its reply is never read
    taking = f"{prefix}item.checks.acme.taking.{doomed.consumer_id}"
    deadline = time.monotonic() + 5
    while not raw.llen(taking) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert raw.llen(f"{prefix}item.checks.acme") == 0 and raw.llen(taking) == 1  # moved, not gone

    with take_connection(prefix) as connection:
        received: list = []
        survivor = _consuming(connection, ["default", "bravo", "acme"], received)
        time.sleep(1.2)  # the dead consumer stops saying it is alive
        survivor.sweep()
        assert raw.llen(taking) == 0 and raw.llen(f"{prefix}item.checks.acme") == 1
        deadline = time.monotonic() + 5
        while not received and time.monotonic() < deadline:
            _take_once(connection, survivor)
        [message] = received
        assert message.delivery_info == {"exchange": "", "routing_key": "item.checks.acme"}  # the truth, only
        assert tenant_of_queue(message.delivery_info["routing_key"]) == "acme"
        survivor.qos.restore_unacked()  # never acknowledged: back where it was taken, not where it claimed to go
    assert raw.llen(f"{prefix}item.checks.acme") == 1 and raw.llen(f"{prefix}item.checks.bravo") == 0


def _take_once(connection: Connection, channel) -> None:
    from kombu.transport.redis import Empty

    connection.transport.cycle._register_BRPOP(channel)
    time.sleep(0.05)
    with contextlib.suppress(Empty):
        channel._brpop_read()
