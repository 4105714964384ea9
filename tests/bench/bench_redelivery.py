"""How long the messages a SIGKILLed worker held unacknowledged take to be filed by another worker.

    python -m tests.bench.bench_redelivery [--broker redis|rabbitmq] [--visibility-timeout 30] [--messages 20]

A worker whose ledger is unreachable takes messages and holds them unacknowledged (as it does through a
Postgres outage); it is SIGKILLed; a healthy worker is started at once, and the time from the kill until every
message is a row in the ledger is measured. On Redis that is the visibility timeout (ITEM_INTAKE_VISIBILITY_
TIMEOUT_S) plus up to one restore sweep (2 s); RabbitMQ gives the messages back the moment the connection drops.
`tests/integration/test_celery_worker.py` runs it with a 5 s timeout.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import redis
import sqlalchemy as sa

from tests.conftest import encode, noise_image
from tests.integration.brokers import RabbitServer, free_port
from tests.integration.conftest import temporary_postgres_database
from tests.integration.stack import make_stack, platform_client, tiny_models
from tests.integration.test_celery_worker import CeleryWorker
from worker.ledger.models import CheckRow


def measure(stack, messages: int = 20) -> dict:
    """Seconds from the SIGKILL of a worker holding `messages` until all are filed by another."""
    unreachable = {**stack.env, "ITEM_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:{free_port()}/none"}
    holder = CeleryWorker(stack, "holder", "--gpus", "0", env=unreachable)
    ids = [f"held-{i}" for i in range(messages)]
    client = platform_client(stack.env["ITEM_BROKER_URL"], stack.prefix)
    for i, external_id in enumerate(ids):
        image = base64.b64encode(encode(noise_image(900 + i, 32, 32))).decode()
        client.send_task(
            "item.check", kwargs={"external_id": external_id, "image": {"b64": image}}, queue="item.checks"
        )
    _wait_held(stack, holder, messages)
    os.killpg(holder.process.pid, signal.SIGKILL)
    killed = time.monotonic()
    holder.process.wait()
    healthy = CeleryWorker(stack, "healthy", "--gpus", "0")
    try:
        while _filed(stack, ids) < messages:
            if time.monotonic() - killed > 600:
                raise AssertionError(f"only {_filed(stack, ids)} of {messages} filed after 600 s")
            time.sleep(0.1)
        return {"messages": messages, "filed_after_kill_s": round(time.monotonic() - killed, 1)}
    finally:
        healthy.process.send_signal(signal.SIGTERM)
        healthy.wait_exit(60)


def _wait_held(stack, holder, messages: int, timeout: float = 60) -> None:
    """Until the holder took every message (Redis: in its unacknowledged set; RabbitMQ: its log says so)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "redis" in stack.env["ITEM_BROKER_URL"]:
            if redis.Redis.from_url(stack.env["ITEM_BROKER_URL"]).hlen(f"{stack.prefix}unacked") >= messages:
                return
        elif holder.log.read_text().count("cannot file") >= 1:
            time.sleep(2)  # the rest of the prefetch arrives with the first
            return
        time.sleep(0.1)
    raise AssertionError(f"the holder never took the messages:\n{holder.log.read_text()[-2000:]}")


def _filed(stack, ids: list[str]) -> int:
    with stack.ledger.session() as session:
        query = sa.select(sa.func.count()).select_from(CheckRow).where(CheckRow.external_id.in_(ids))
        return session.scalar(query)


@contextmanager
def _broker_url(kind: str, folder: Path):
    if kind == "redis":
        yield {}
        return
    server = RabbitServer(folder / "rabbit")
    server.start()
    try:
        yield {"ITEM_BROKER_URL": server.url}
    finally:
        server.kill()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--visibility-timeout", type=float, default=15.0, help="ITEM_INTAKE_VISIBILITY_TIMEOUT_S")
    parser.add_argument("--messages", type=int, default=20)
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        store = tiny_models(folder / "models")
        with _broker_url(args.broker, folder) as broker, temporary_postgres_database(args.postgres_url) as url:
            overrides = {"ITEM_INTAKE_VISIBILITY_TIMEOUT_S": str(args.visibility_timeout), **broker}
            with contextmanager(make_stack)(url, store, folder, **overrides) as stack:
                result = measure(stack, args.messages)
    print(json.dumps({"broker": args.broker, "visibility_timeout_s": args.visibility_timeout, **result}))


if __name__ == "__main__":
    main()
