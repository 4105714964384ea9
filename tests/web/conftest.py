"""The API and console against a real, migrated PostgreSQL ledger, with checks run by the real worker code.

Checks are filed through the application (the intake) and run by a `CheckService` on the tiny profile in this
process, so every result, artifact and thumbnail the pages read was written by the code a worker runs.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from pipeline.core.detector import Detector
from pipeline.core.profiles import get_profile
from tests.conftest import encode, noise_image, random_head
from tests.integration.brokers import free_port
from tests.integration.conftest import temporary_postgres_database
from worker.gpu.batches import CheckService
from worker.gpu.loop import Loop
from worker.ledger import migrate, tenants
from worker.ledger.models import DEFAULT_TENANT, Base
from worker.ledger.store import Ledger
from worker.settings import Settings
from worker.web.app import create_app
from worker.web.keys import SCOPES, create_key

ITEM = Path(sys.executable).parent / "item"


@dataclass
class Served:
    settings: Settings
    ledger: Ledger
    service: CheckService
    keys: dict[str, str]  # scope: a key with only that scope

    def headers(self, scope: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[scope]}"}

    def run_checks(self) -> int:
        """Runs every queued check through the worker's phases here; returns how many ran."""
        loop, ran = Loop(self.service, listener=_NoListener()), 0
        while n := loop.run_once():
            ran += n
        return ran


class _NoListener:
    def close(self) -> None:
        pass


def image_b64(seed: int, width: int = 96, height: int = 72) -> str:
    return base64.b64encode(encode(noise_image(seed, width, height))).decode()


@pytest.fixture(scope="module")
def served_database() -> Iterator[str]:
    with temporary_postgres_database() as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture
def served(served_database, tiny_store) -> Iterator[Served]:
    """A fresh ledger state (every table emptied), a tiny detector's version active, a key per scope."""
    ledger = Ledger(served_database)
    with ledger.session() as session:
        for table in reversed(Base.metadata.sorted_tables):
            session.execute(sa.delete(table))
        tenants.create_tenant(session, DEFAULT_TENANT)  # what the migration seeds, emptied with the rest
    settings = Settings(database_url=served_database, batch_size=8, batch_max_wait_s=0, profile="tiny")
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    detector.use_head(random_head(detector))
    service = CheckService(settings, ledger, detector)
    service.register_version(activate=True)
    keys = {scope: create_key(ledger, f"test-{scope}", [scope]).key for scope in SCOPES}
    yield Served(settings, ledger, service, keys)
    ledger.dispose()


@pytest.fixture
def client(served) -> Iterator[TestClient]:
    with TestClient(create_app(served.settings), follow_redirects=False) as test_client:
        yield test_client


@pytest.fixture
def server(served, tmp_path) -> Iterator[tuple[str, Path]]:
    """`item serve` on a free port; yields its base URL and the file its output goes to."""
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "ITEM_DATABASE_URL": served.settings.database_url, "ITEM_HTTP_PORT": str(port)}
    with log.open("w") as output:
        process = subprocess.Popen([ITEM, "serve", "--log-level", "info"], env=env, stdout=output, stderr=output)
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(base, process, log)
        yield base, log
    finally:
        process.terminate()
        process.wait(10)


def _wait_until_up(base: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"item serve exited: {log.read_text()}")
        try:
            if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise AssertionError(f"item serve did not answer in 30 s: {log.read_text()}")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (apt-get install chromium)")


@pytest.fixture
def browser():
    """A headless Chromium (Debian's, launched by its path: no browser is downloaded)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield launched
        launched.close()
