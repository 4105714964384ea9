"""Ledger databases for integration tests: a fresh one per test module, on SQLite and on PostgreSQL.

PostgreSQL is a documented requirement of these tests (`ITEM_TEST_POSTGRES_URL`, default a local server with
trust auth): when it cannot be reached the tests fail, saying so, rather than skipping.
"""

from __future__ import annotations

import os
import secrets
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

from tests.integration.stack import REDIS_URL, image_server
from worker.ledger import migrate
from worker.ledger.models import (
    DEFAULT_TENANT,
    ApiKeyRow,
    ArtifactRow,
    BlobRow,
    CallbackSecretRow,
    CheckKeyRow,
    CheckLatencyRow,
    CheckRollupRow,
    CheckRow,
    CheckTotalRow,
    ConsoleSessionRow,
    DecisionRow,
    DeliveryRow,
    ImageRow,
    PipelineVersionRow,
    ReviewItemRow,
    TenantBucketRow,
    TenantRow,
    ThumbnailRow,
    WorkerRow,
)
from worker.ledger.near_rows import BankEntryRow, NearHashRow
from worker.ledger.store import Ledger

POSTGRES_URL = os.environ.get("ITEM_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgres")


@contextmanager
def temporary_postgres_database(server_url: str = POSTGRES_URL) -> Iterator[str]:
    """Creates `item_test_<hex>` on the server of `server_url`, yields its URL, and drops it afterwards."""
    name = f"item_test_{secrets.token_hex(6)}"
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    unreachable = None
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sa.exc.OperationalError as error:
        unreachable = error.orig
    if unreachable is not None:
        admin.dispose()
        pytest.fail(
            f"PostgreSQL is required for the integration tests and is not reachable at {_shown(server_url)} "
            f"(set ITEM_TEST_POSTGRES_URL): {unreachable}",
            pytrace=False,
        )
    try:
        yield sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _shown(url: str) -> str:
    return sa.make_url(url).render_as_string(hide_password=True)


@contextmanager
def temporary_database(backend: str, folder: Path) -> Iterator[str]:
    """A fresh, empty database URL of `backend` ("sqlite": a file in `folder`; "postgres": a new database)."""
    if backend == "sqlite":
        yield f"sqlite:///{folder / 'ledger.sqlite3'}"
        return
    with temporary_postgres_database() as url:
        yield url


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A fresh, empty (unmigrated) PostgreSQL database for this test module."""
    with temporary_postgres_database() as url:
        yield url


@pytest.fixture(scope="module", params=BACKENDS)
def database_url(request, tmp_path_factory) -> Iterator[str]:
    """A fresh, empty (unmigrated) database for this test module, once per backend."""
    with temporary_database(request.param, tmp_path_factory.mktemp(f"ledger-{request.param}")) as url:
        yield url


@pytest.fixture(scope="module")
def migrated_ledger(database_url) -> Iterator[Ledger]:
    migrate.upgrade(database_url)
    ledger = Ledger(database_url)
    yield ledger
    ledger.dispose()


@pytest.fixture
def ledger(migrated_ledger) -> Ledger:
    """The module's migrated ledger, emptied, so each test starts from no rows."""
    with migrated_ledger.session() as session:
        for model in (
            *(DecisionRow, DeliveryRow, CheckKeyRow, CheckRow, ArtifactRow, BlobRow, ImageRow, PipelineVersionRow),
            *(ConsoleSessionRow, ApiKeyRow, ThumbnailRow, WorkerRow),
            *(CheckRollupRow, CheckTotalRow, CheckLatencyRow),
            *(TenantBucketRow, CallbackSecretRow, ReviewItemRow, NearHashRow, BankEntryRow),
        ):
            session.execute(sa.delete(model))
        # Every tenant but the one a migrated ledger starts with, which gets its first settings back.
        session.execute(sa.delete(TenantRow).where(TenantRow.id != DEFAULT_TENANT))
        session.execute(
            sa.update(TenantRow).values(
                weight=1, rate_per_s=None, burst=None, backlog_cap=None, pipeline_version_id=None, disabled_at=None
            )
        )
    return migrated_ledger


@pytest.fixture
def stream() -> Iterator[tuple[str, redis.Redis]]:
    """A results stream of this test's own on the machine's Redis (its name, a client), deleted afterwards."""
    client = redis.Redis.from_url(REDIS_URL)
    name = f"item-test-results-{uuid.uuid4().hex}"
    yield name, client
    client.delete(name)
    client.close()


@pytest.fixture(scope="module")
def images():
    """A local HTTP server of test images (and of slow, hanging and failing answers) for this module."""
    with image_server() as server:
        yield server


@pytest.fixture
def prefix() -> Iterator[str]:
    """A Redis key prefix of this test's own on the machine's Redis; its keys are deleted afterwards."""
    prefix = f"item-test-{uuid.uuid4().hex[:10]}:"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def take_connection(prefix: str, transport: str | None = "worker.intake.redis_take:Transport"):
    """A kombu connection to the machine's Redis under `prefix`, taking `item.checks` (and tenants' queues) the
    intake's way (`worker.intake.redis_take`; `transport` None: kombu's own, as a platform's client)."""
    from kombu import Connection

    from worker.settings import CHECK_QUEUE

    options = {"global_keyprefix": prefix, "atomic_queues": [CHECK_QUEUE], "taking_alive_s": 1.0}
    return Connection(REDIS_URL, transport=transport, transport_options=options)
