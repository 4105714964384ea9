"""Waking idle workers when checks are filed, without a message per check.

On PostgreSQL, once the intake's transaction has committed, `NOTIFY item_checks, '<version id>'` is sent and
each idle worker waits on `LISTEN item_checks` with a timeout, so a new check is claimed at once and an idle
worker costs one cheap query per `idle_poll_s`.

Notifications are coalesced: a process sends at most one per version every COALESCE_S, and one that falls
inside that window is sent at its end instead (so the last filing is always followed by one). A committing
transaction that notified holds a database-wide lock while it commits, so a NOTIFY in every intake transaction
would line their commits up one behind the other; sent this way, it is a tiny transaction of its own a few
times a second, whatever the intake's rate. SQLite has no notifications: there the timeout is the poll. Either way
the wait is only an optimisation: the ledger is the record, and a worker that misses a notification claims the
check at its next poll.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session

from worker.ledger.engine import libpq_dsn

log = logging.getLogger("item.worker")

CHANNEL = "item_checks"


COALESCE_S = 0.05


def notify_new_checks(session: Session, version_id: str) -> None:
    """Tells idle workers of `version_id` that checks were filed, once `session` commits (nothing on SQLite)."""
    engine = session.get_bind()
    if engine.dialect.name == "postgresql":
        event.listen(session, "after_commit", lambda _session: _wakeups.filed(engine, version_id), once=True)


class _Wakeups:
    """This process's notifications: at most one per version and COALESCE_S, the rest sent at the window's end."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sent_at: dict[str, float] = {}
        self._pending: set[str] = set()

    def filed(self, engine: sa.Engine, version_id: str) -> None:
        with self._lock:
            wait = self._sent_at.get(version_id, -COALESCE_S) + COALESCE_S - time.monotonic()
            if wait > 0:
                if version_id not in self._pending:  # one trailing notification covers the whole window
                    self._pending.add(version_id)
                    threading.Timer(wait, self._trailing, (engine, version_id)).start()
                return
            self._sent_at[version_id] = time.monotonic()
        _send(engine, version_id)

    def _trailing(self, engine: sa.Engine, version_id: str) -> None:
        with self._lock:
            self._pending.discard(version_id)
            self._sent_at[version_id] = time.monotonic()
        _send(engine, version_id)


def _send(engine: sa.Engine, version_id: str) -> None:
    """One NOTIFY on a pooled connection, below SQLAlchemy's statement events: a wake-up sent from a timer
    thread is no statement of whatever transaction that thread's process is counting."""
    try:
        connection = engine.raw_connection()
        try:
            connection.cursor().execute("SELECT pg_notify(%s, %s)", (CHANNEL, version_id))
            connection.commit()
        finally:
            connection.close()  # back to the pool
    except Exception as error:  # an optimisation only: the workers' poll finds the checks
        log.info("could not wake idle workers: %s", error)


_wakeups = _Wakeups()


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
