"""Waking idle workers when checks are filed, without a message per check.

On PostgreSQL the intake's transaction sends `NOTIFY item_checks, '<version id>'` (delivered at commit) and each
idle worker waits on `LISTEN item_checks` with a timeout, so a new check is claimed at once and an idle worker
costs one cheap query per `idle_poll_s`. SQLite has no notifications: there the timeout is the poll. Either way
the wait is only an optimisation: the ledger is the record, and a worker that misses a notification claims the
check at its next poll.
"""

from __future__ import annotations

import contextlib
import logging
import time

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger.engine import libpq_dsn

log = logging.getLogger("item.worker")

CHANNEL = "item_checks"


def notify_new_checks(session: Session, version_id: str) -> None:
    """Tells idle workers of `version_id` that checks were filed (at commit; nothing on SQLite)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(sa.select(sa.func.pg_notify(CHANNEL, version_id)))


class Listener:
    """One worker's wait for new checks of its version: LISTEN on PostgreSQL, a plain sleep on SQLite.

    The listening connection is its own (autocommit, outside the pool), to `session_url`
    (`Settings.session_database_url`): a LISTEN lasts as long as its server session, which PgBouncer in
    transaction mode would hand to another client after the statement. When it breaks (the database restarted,
    its connection was terminated) waiting falls back to sleeping, and the next wait connects again.
    """

    def __init__(self, session_url: str, version_id: str):
        url = sa.make_url(session_url)
        self.version_id = version_id
        self._dsn = libpq_dsn(url)
        self._postgres = url.get_backend_name() == "postgresql"
        self._connection = None

    def wait(self, timeout_s: float) -> bool:
        """Waits up to `timeout_s` for news of this version's checks; True if some came (or may have)."""
        if not self._postgres:
            time.sleep(timeout_s)
            return False
        try:
            connection = self._connect()
            for note in connection.notifies(timeout=timeout_s, stop_after=1):
                return note.payload == self.version_id or not note.payload
            return False
        except Exception as error:  # the listener is an optimisation: never let it stop the loop
            log.info("waiting for new checks by polling: %s", error)
            self.close()
            time.sleep(timeout_s)
            return False

    def _connect(self):
        if self._connection is None or self._connection.closed:
            import psycopg

            self._connection = psycopg.connect(self._dsn, autocommit=True, connect_timeout=5)
            self._connection.execute(f"LISTEN {CHANNEL}")
        return self._connection

    def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None
