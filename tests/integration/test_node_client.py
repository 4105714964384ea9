"""A platform's client in another language: celery-node (from the npm registry) sends `item.check` to a real
Celery worker, on Redis and on RabbitMQ, and every message becomes a check in the ledger."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from tests.conftest import encode, noise_image
from tests.integration.stack import REDIS_URL, make_stack
from tests.integration.test_brokers import vhost  # noqa: F401  (a fixture)
from tests.integration.test_celery_worker import CeleryWorker
from worker.ledger.models import CheckRow

SCRIPT = Path(__file__).parent / "node" / "send.js"
CELERY_NODE = "celery-node@0.5.9"
NODE_REDIS_DB = 13  # celery-node has no key prefix: a Redis database of this test's own instead


@pytest.fixture(scope="module")
def node_modules(tmp_path_factory) -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js and npm are not installed")
    folder = tmp_path_factory.mktemp("node")
    installed = subprocess.run(
        ["npm", "install", "--no-audit", "--no-fund", "--silent", CELERY_NODE],
        cwd=folder, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if installed.returncode != 0:
        pytest.skip(f"npm could not install {CELERY_NODE}: {installed.stderr[-500:]}")
    return folder / "node_modules"


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request):
    if request.param == "rabbitmq":
        yield request.getfixturevalue("vhost")
        return
    url = REDIS_URL.rsplit("/", 1)[0] + f"/{NODE_REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


def test_celery_node_messages_become_checks(node_modules, broker_url, postgres_url, tiny_store, tmp_path):
    for stack in make_stack(postgres_url, tiny_store, tmp_path, ITEM_BROKER_URL=broker_url, ITEM_REDIS_KEY_PREFIX=""):
        worker = CeleryWorker(stack, "node", "--gpus", "0")  # the intake is what reads the client's messages
        try:
            image = base64.b64encode(encode(noise_image(5))).decode()
            env = {**os.environ, "NODE_PATH": str(node_modules)}
            sent = subprocess.run(
                ["node", str(SCRIPT), broker_url, "node", "4", image], env=env, capture_output=True, text=True,
                timeout=60,
            )  # fmt: skip
            assert sent.returncode == 0, sent.stderr
            ids = [f"node-{i}" for i in range(4)]
            assert _wait_filed(stack, ids) == dict.fromkeys(ids, "queued")
        finally:
            worker.process.terminate()
            worker.wait_exit(60)


def _wait_filed(stack, ids: list[str], timeout: float = 60) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    while True:
        with stack.ledger.session() as session:
            query = sa.select(CheckRow.external_id, CheckRow.status).where(CheckRow.external_id.in_(ids))
            statuses = {
                external_id: str(getattr(status, "value", status)) for external_id, status in session.execute(query)
            }
        if len(statuses) == len(ids) or time.monotonic() > deadline:
            return statuses
        time.sleep(0.2)
