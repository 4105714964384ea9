"""Failure paths of the real stack: killed workers, lost messages, dropped database connections.

Each test starts its own worker(s) and ends every check it submits, or fails saying which did not finish.
"""

from __future__ import annotations

import threading
from dataclasses import replace

import pytest
import sqlalchemy as sa

from tests.integration.stack import Worker, make_stack
from worker.ledger.models import CheckRow


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    yield from make_stack(postgres_url, tiny_store, tmp_path_factory.mktemp("failures"))


def _done_exactly_once(stack, check_ids: list[str]) -> None:
    rows = stack.wait_terminal(check_ids, timeout=120)
    assert {row.status for row in rows.values()} == {"done"}, {r.id: (r.status, r.error_code) for r in rows.values()}
    with stack.ledger.session() as session:
        count = session.scalar(sa.select(sa.func.count()).where(CheckRow.id.in_(check_ids)))
    assert count == len(check_ids)


def test_sigkill_during_a_batch_loses_no_check(stack):
    first = Worker(stack, "killed")
    paths = [str(stack.image(100 + i)) for i in range(12)]
    submitted = stack.submit(*paths)
    first.wait_for(r"model_images=\d+", 60)  # a batch is under way
    first.kill()  # SIGKILL to the whole worker: parent, child and beat
    second = Worker(stack, "replacement")
    try:
        _done_exactly_once(stack, [s["check_id"] for s in submitted])
    finally:
        second.stop()


def test_submitted_checks_need_no_message_so_a_broker_that_loses_everything_loses_none(stack):
    paths = [str(stack.image(200 + i)) for i in range(5)]
    submitted = stack.submit(*paths)  # rows queued in the ledger, no worker yet
    for key in stack.redis.scan_iter(f"{stack.prefix}*"):  # the broker restarts empty
        stack.redis.delete(key)
    worker = Worker(stack, "after-wipe")
    try:
        _done_exactly_once(stack, [s["check_id"] for s in submitted])
    finally:
        worker.stop()


def test_dropped_database_connections_are_retried(stack, postgres_url):
    """Terminates the worker's Postgres connections over and over while it works; every check still ends done."""
    worker_url = f"{postgres_url}?application_name=item-worker"
    worker = Worker(replace(stack, env={**stack.env, "ITEM_DATABASE_URL": worker_url}), "pg-drop")
    admin = sa.create_engine(sa.make_url(postgres_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    database = sa.make_url(postgres_url).database  # this module's: never another test process's workers
    finished = threading.Event()
    dropped = []

    def keep_dropping() -> None:
        with admin.connect() as connection:
            while not finished.wait(0.25):
                dropped.append(
                    connection.execute(
                        sa.text(
                            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                            "WHERE application_name = 'item-worker' AND datname = :db"
                        ),
                        {"db": database},
                    ).scalar()
                )

    dropper = threading.Thread(target=keep_dropping)
    try:
        submitted = stack.submit(*[str(stack.image(300 + i)) for i in range(30)])
        dropper.start()
        _done_exactly_once(stack, [s["check_id"] for s in submitted])
        finished.set()
        dropper.join()
        # Connections were terminated while checks ran (whether a drop lands mid-query, failing a statement,
        # or on an idle pooled connection, replaced on checkout, depends on timing; both must be survived).
        assert sum(dropped) > 0
        assert worker.process.poll() is None  # and the worker kept serving
    finally:
        finished.set()
        worker.stop()
        admin.dispose()
