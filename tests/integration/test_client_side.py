"""The client side runs without the model libraries: each command in a process where importing them fails.

`item submit` (with a real Redis configured), `status`, `results`, `versions` and `deliveries` against a real migrated
ledger, in an interpreter whose `torch`, `numpy` and model libraries cannot be imported at all: a lazy import
anywhere on these paths would make the command fail here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid

import pytest
import redis

from pipeline.core.results import PipelineVersion
from tests.conftest import encode, noise_image
from tests.integration.stack import REDIS_URL
from worker.ledger import migrate
from worker.ledger.store import Ledger

BLOCKED = ("torch", "numpy", "open_clip", "transformers", "PIL", "sklearn", "scipy")
# Runs `item` in-process with the blocked modules marked missing: `import torch` raises ImportError.
RUNNER = (
    "import sys\n"
    f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
    "from worker.cli.main import app\n"
    "app(sys.argv[1:], prog_name='item')\n"
)
VERSION = PipelineVersion(caption="caption:c@1|impl=1", ground="ground:g@1|impl=1", embed="embed:e@1|impl=1", head="h1")


@pytest.fixture
def ledger_url(database_url):
    migrate.upgrade(database_url)
    ledger = Ledger(database_url)
    with ledger.session() as session:
        ledger.ensure_pipeline_version(session, VERSION, "tiny")  # as a first worker would
    ledger.dispose()
    return database_url


def item_without_models(env: dict, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", RUNNER, *args], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_client_commands_run_without_the_model_libraries(ledger_url, tmp_path):
    prefix = f"item-test-{uuid.uuid4().hex[:10]}:"
    env = {**os.environ, "ITEM_DATABASE_URL": ledger_url, "ITEM_BROKER_URL": REDIS_URL, "ITEM_REDIS_KEY_PREFIX": prefix}
    image = tmp_path / "upload.png"
    image.write_bytes(encode(noise_image(5)))
    client = redis.Redis.from_url(REDIS_URL)
    try:
        [submitted] = [
            json.loads(line) for line in item_without_models(env, "submit", "--json", str(image)).stdout.splitlines()
        ]
        assert submitted["created"] is True and submitted["status"] == "queued"
        assert client.llen(f"{prefix}item.checks") == 0  # filed in the ledger directly: no message needed

        status = json.loads(item_without_models(env, "status", "--json").stdout)
        assert status["queued"] == 1
        [row] = [json.loads(line) for line in item_without_models(env, "results", "--json").stdout.splitlines()]
        assert row["id"] == submitted["check_id"] and row["pipeline_version_id"] == VERSION.id
        [version] = [json.loads(line) for line in item_without_models(env, "versions", "--json").stdout.splitlines()]
        assert version["id"] == VERSION.id and version["checks"] == {"queued": 1}
        assert item_without_models(env, "deliveries", "list", "--json").stdout == ""
    finally:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
