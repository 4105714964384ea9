"""A real service stack for tests: per-run Postgres database and Redis key prefix, `item worker` processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from pipeline.core.detector import Detector
from pipeline.core.profiles import get_profile
from tests.conftest import encode, noise_image, random_head
from worker.ledger import migrate
from worker.ledger.models import CheckRow
from worker.ledger.store import Ledger
from worker.runtime import build_service
from worker.settings import Settings

ITEM = Path(sys.executable).parent / "item"
REDIS_URL = os.environ.get("ITEM_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TERMINAL = {"done", "rejected", "failed"}


@dataclass
class Stack:
    env: dict[str, str]
    ledger: Ledger
    redis: redis.Redis
    prefix: str
    folder: Path

    @property
    def settings(self) -> Settings:
        # As pydantic-settings reads the environment: complex (list) values arrive as JSON.
        keys = {k[len("ITEM_") :].lower(): v for k, v in self.env.items() if k.startswith("ITEM_")}
        return Settings(**{k: json.loads(v) if v.startswith("[") else v for k, v in keys.items()})

    def image(self, seed: int, fmt: str = "PNG") -> Path:
        path = self.folder / f"image-{seed}.{fmt.lower()}"
        path.write_bytes(encode(noise_image(seed, 64 + seed % 5 * 8, 72), fmt))
        return path

    def submit(self, *args: str) -> list[dict]:
        result = run_item(self.env, "submit", "--json", *args)
        return [json.loads(line) for line in result.stdout.splitlines()]

    def wait_terminal(self, check_ids: list[str], timeout: float = 90.0) -> dict[str, CheckRow]:
        deadline = time.monotonic() + timeout
        while True:
            with self.ledger.session() as session:
                rows = {cid: self.ledger.get_check(session, cid) for cid in check_ids}
            if all(row is not None and row.status in TERMINAL for row in rows.values()):
                return rows
            if time.monotonic() > deadline:
                states = {cid: (row.status if row else None) for cid, row in rows.items()}
                pytest.fail(f"checks not finished in {timeout}s: {states}")
            time.sleep(0.3)

    def queue_length(self) -> int:
        return self.redis.llen(f"{self.prefix}item.checks")


class Worker:
    """`item worker` in its own process group, so a test can SIGKILL the whole tree at once."""

    def __init__(self, stack: Stack, name: str, concurrency: int = 1, env: dict[str, str] | None = None):
        self.log = stack.folder / f"{name}.log"
        self.process = subprocess.Popen(
            [str(ITEM), "worker", "--concurrency", str(concurrency), "--loglevel", "INFO"],
            env=env or stack.env,
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_for(r"ready\.", 90)

    def wait_for(self, pattern: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.log.read_text()):
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"worker never logged {pattern!r}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def model_images(self) -> int:
        return sum(int(n) for n in re.findall(r"model_images=(\d+)", self.log.read_text()))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(30)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


def run_item(env: dict, *args: str, check_exit: int | None = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([str(ITEM), *args], env=env, capture_output=True, text=True, timeout=300)
    if check_exit is not None:
        assert result.returncode == check_exit, result.stdout + result.stderr
    return result


def make_stack(postgres_url: str, tiny_store, folder: Path, **overrides: str):
    """Yields a Stack; cleans its Redis keys afterwards. Overrides are ITEM_* variables."""
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    head_path = random_head(detector).save(folder / "head.safetensors")
    prefix = f"item-test-{uuid.uuid4().hex[:10]}:"
    env = {
        **os.environ,
        "ITEM_PROFILE": "tiny",
        "ITEM_MODEL_DIR": str(tiny_store.model_dir),
        "ITEM_ALLOW_DOWNLOAD": "false",
        "ITEM_HEAD": str(head_path),
        "ITEM_DEVICE": "cpu",
        "ITEM_DATABASE_URL": postgres_url,
        "ITEM_BROKER_URL": REDIS_URL,
        "ITEM_REDIS_KEY_PREFIX": prefix,
        "ITEM_BATCH_SIZE": "4",
        "ITEM_BATCH_MAX_WAIT_S": "0.3",
        "ITEM_BATCH_TIME_BUDGET_S": "8",
        "ITEM_VISIBILITY_TIMEOUT_S": "12",
        "ITEM_RECONCILE_AFTER_S": "10",
        "ITEM_RECONCILE_INTERVAL_S": "2",
        "ITEM_RETRY_BACKOFF_S": "0.5",
        "ITEM_ALLOWED_PATH_ROOTS": json.dumps([str(folder)]),
        "HF_HUB_OFFLINE": "1",
        "ITEM_METRICS_PORT": "0",  # off unless a test asks for it
        "ITEM_METRICS_DIR": str(folder / "metrics"),
        **overrides,
    }
    migrate.upgrade(postgres_url)
    client = redis.Redis.from_url(REDIS_URL)
    stack = Stack(env, Ledger(postgres_url), client, prefix, folder)
    build_service(stack.settings, enqueue=lambda kwargs, countdown, queue: None)  # registers the pipeline version,
    yield stack  # as a first worker would, so tests may submit before any worker runs
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)
