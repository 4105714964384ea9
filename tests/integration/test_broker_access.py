"""Each tenant's broker user, made by `item broker`, against the real servers: a tenant's Celery client, set up as
the README says, sends into its own queue and a real worker files the check as that tenant's; writing into another
tenant's queue (its exchange, the default exchange with its routing key, its Redis list) is refused by the broker
itself, and nothing reaches that tenant's queue or ledger. Reading another's keys, or anything but publishing, is
refused too."""

from __future__ import annotations

import base64
import json
import subprocess
import time
import uuid

import pytest
import redis
import sqlalchemy as sa
from amqp.exceptions import AccessRefused
from celery import Celery
from kombu import Connection, Exchange, Queue
from kombu.exceptions import OperationalError
from typer.testing import CliRunner

from tests.conftest import encode, noise_image
from tests.integration.brokers import RedisServer
from tests.integration.stack import ITEM, Worker, make_stack
from worker.cli.main import app as item
from worker.intake.queues import queue_name
from worker.ledger import migrate
from worker.ledger.models import CheckRow
from worker.ledger.store import Ledger
from worker.ledger.tenants import create_tenant

PNG = base64.b64encode(encode(noise_image(9, 32, 32))).decode()
RUN = uuid.uuid4().hex[:8]
ALPHA, BETA = TENANTS = f"alpha-{RUN}", f"beta-{RUN}"


def tenant_client(broker_url: str, tenant_id: str, prefix: str = "") -> Celery:
    """A platform's Celery client, configured as the README tells a tenant to: JSON, its own queue, exchange and
    routing key, declaring nothing (its broker user may not), and the deployment's key prefix on Redis."""
    name = queue_name(tenant_id)
    queue = Queue(name, Exchange(name, type="direct", no_declare=True), routing_key=name, no_declare=True)
    app = Celery("platform", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_queues=[queue],
        task_default_queue=name,
        task_routes={"item.check": {"queue": name, "exchange": name, "routing_key": name}},
        task_create_missing_queues=False,
        broker_transport_options={"confirm_publish": True, **({"global_keyprefix": prefix} if prefix else {})},
    )
    return app


def _item(env: dict, *args: str) -> dict:
    result = CliRunner().invoke(item, [*args, "--json"], env=env)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.strip().splitlines()[-1])


def _apply_rabbitmq_user(env: dict, tenant_id: str) -> subprocess.Popen:
    command = [str(ITEM), "broker", "rabbitmq-user", tenant_id, "--apply", "--user", f"item-test-{tenant_id}", "--json"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)


def _rabbitmqctl(*args: str) -> subprocess.Popen:
    return subprocess.Popen(["rabbitmqctl", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ---------------------------------------------------------------------- RabbitMQ


@pytest.fixture(scope="module")
def vhost():
    """A vhost of this module's own on the machine's RabbitMQ (the service's user: guest), and the tenants' users
    made in it; all deleted afterwards."""
    name = f"item-test-{RUN}"
    subprocess.run(["rabbitmqctl", "add_vhost", name], check=True, capture_output=True, timeout=60)
    subprocess.run(
        ["rabbitmqctl", "set_permissions", "-p", name, "guest", ".*", ".*", ".*"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    yield name
    cleaning = [_rabbitmqctl("delete_vhost", name)]
    cleaning += [_rabbitmqctl("delete_user", f"item-test-{tenant_id}") for tenant_id in (ALPHA, BETA)]
    for process in cleaning:
        process.wait(60)


@pytest.fixture(scope="module")
def rabbit(vhost, postgres_url, tiny_store, tmp_path_factory):
    """The tenants' users made with `item broker rabbitmq-user --apply` while a real intake worker starts."""
    service_url = f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    folder = tmp_path_factory.mktemp("rabbit-access")
    for stack in make_stack(postgres_url, tiny_store, folder, ITEM_BROKER_URL=service_url, ITEM_TENANT_REFRESH_S="0.5"):
        with stack.ledger.session() as session:
            for tenant_id in (ALPHA, BETA):
                create_tenant(session, tenant_id)
        users = [_apply_rabbitmq_user(stack.env, tenant_id) for tenant_id in TENANTS]  # seconds each: meanwhile
        worker = Worker(stack, "rabbit-tenants", concurrency=0)  # the worker starts
        made = {
            tenant_id: json.loads(user.communicate(timeout=120)[0])
            for tenant_id, user in zip(TENANTS, users, strict=True)
        }
        try:
            worker.wait_for(rf"intake consuming item\.checks\.{BETA}", 30)
            yield stack, made, service_url
        finally:
            worker.stop()


def test_a_rabbitmq_tenant_sends_into_its_own_queue_only(rabbit):
    stack, made, service_url = rabbit
    alpha, beta = made[ALPHA], made[BETA]
    assert alpha["permissions"] == {"configure": "^$", "write": rf"^item\.checks\.{ALPHA}$", "read": "^$"}
    assert alpha["broker_url"].startswith(f"amqp://item-test-{ALPHA}:")
    client = tenant_client(alpha["broker_url"], ALPHA)

    # its own queue: filed as its check, even one whose headers name the other tenant
    client.send_task("item.check", kwargs={"external_id": "own", "image": {"b64": PNG}})
    client.send_task("item.check", kwargs={"external_id": "claims-beta", "image": {"b64": PNG}},
                     headers={"tenant": BETA, "tenant_id": BETA})  # fmt: skip

    # the other tenant's exchange, and the default exchange with the other's queue as routing key: refused
    other = queue_name(BETA)
    with pytest.raises(AccessRefused, match=f"exchange '{other}'"):
        client.send_task("item.check", kwargs={"external_id": "into-beta"}, exchange=other, routing_key=other)
    with pytest.raises(AccessRefused, match="amq.default"):
        client.send_task("item.check", kwargs={"external_id": "via-default"}, exchange="", routing_key=other)
    with Connection(alpha["broker_url"]) as connection, pytest.raises(AccessRefused):  # declaring: refused too
        Queue("item-test-own", durable=False)(connection.default_channel).declare()

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with stack.ledger.session() as session:
            rows = dict(session.execute(sa.select(CheckRow.external_id, CheckRow.tenant_id)).all())
        if len(rows) >= 2:
            break
        time.sleep(0.05)
    assert rows == {"own": ALPHA, "claims-beta": ALPHA}
    with Connection(service_url) as connection:
        assert connection.default_channel.queue_declare(other, passive=True).message_count == 0
    assert beta["broker_url"] != alpha["broker_url"]


# ---------------------------------------------------------------------- Redis


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis-acl"))
    server.start()
    yield server
    server.kill()


def test_a_redis_tenant_pushes_onto_its_own_list_only(redis_server, postgres_url):
    prefix = "item-acl:"
    migrate.upgrade(postgres_url)
    ledger = Ledger(postgres_url)
    with ledger.session() as session:
        for tenant_id in (f"r-{ALPHA}", f"r-{BETA}"):
            create_tenant(session, tenant_id)
    ledger.dispose()
    env = {"ITEM_BROKER_URL": redis_server.url, "ITEM_REDIS_KEY_PREFIX": prefix, "ITEM_DATABASE_URL": postgres_url}
    alpha = _item(env, "broker", "redis-acl", f"r-{ALPHA}", "--apply")
    beta = _item(env, "broker", "redis-acl", f"r-{BETA}", "--apply")
    own, other = f"{prefix}{queue_name(f'r-{ALPHA}')}", f"{prefix}{queue_name(f'r-{BETA}')}"

    client = tenant_client(alpha["broker_url"], f"r-{ALPHA}", prefix)
    client.send_task("item.check", kwargs={"external_id": "own", "image": {"b64": PNG}})
    client.send_task("item.check", kwargs={"external_id": "urgent", "image": {"b64": PNG}}, priority=6)
    service = redis.Redis.from_url(redis_server.url)
    assert service.llen(own) == 1 and service.llen(f"{own}\x06\x166") == 1

    tenant = redis.Redis.from_url(alpha["broker_url"])
    refused = [
        ("LPUSH", other, "{}"),  # into the other tenant's queue
        ("RPUSH", own, "{}"),  # anything but what publishing runs, even on its own keys
        ("LRANGE", own, 0, -1),
        ("LLEN", other),  # the other's keys, read in any way
        ("SMEMBERS", f"{prefix}_kombu.binding.{queue_name(f'r-{BETA}')}"),
        ("LPUSH", f"{own}.taking.x", "{}"),  # the intake's own lists beside its queue
        ("LPUSH", f"{own}x", "{}"),  # a tenant whose id starts with its own
        ("KEYS", "*"),
        ("FLUSHALL",),
        ("CONFIG", "GET", "*"),
        ("PUBLISH", "x", "y"),
    ]
    for command in refused:
        with pytest.raises(redis.exceptions.NoPermissionError):
            tenant.execute_command(*command)
    into = queue_name(f"r-{BETA}")
    with pytest.raises(OperationalError, match="no permissions"):  # its Celery client, aimed at the other's queue
        client.send_task("item.check", kwargs={"external_id": "into-beta"}, exchange=into, routing_key=into, declare=[])
    assert service.llen(other) == 0 and service.llen(own) == 1
    assert beta["acl"].startswith(f"ACL SETUSER item-r-{BETA} reset on >")
