"""One process of a deployment leads (runs the reconciler): whoever holds a PostgreSQL session advisory lock.

A session lock lasts as long as its server session, so it is taken on a connection of its own, to
`Settings.session_database_url`: direct to PostgreSQL, or through a session-mode pool. Through PgBouncer in
transaction mode it would be taken by whichever server session ran the statement, and that session goes to the
next client: two processes could then both "hold" it, or neither. The connection is autocommit (no transaction
stays open on it) and outside the ledger's pool (it never goes back to one while holding the lock). When the
process dies, or its connection breaks, PostgreSQL ends the session and frees the lock for the next elector.
"""

from __future__ import annotations

import contextlib
import logging

from worker.ledger.engine import libpq_dsn

log = logging.getLogger("item.leadership")

CONNECT_TIMEOUT_S = 5

# pg_try_advisory_lock(bigint) shows in pg_locks as classid (the high 32 bits) and objid (the low), objsubid 1.
_HELD = """
SELECT EXISTS (
    SELECT 1 FROM pg_locks
    WHERE locktype = 'advisory' AND granted AND pid = pg_backend_pid()
      AND classid = (%(key)s::bigint >> 32)::oid AND objid = (%(key)s::bigint & 4294967295)::oid AND objsubid = 1
)
"""


class AdvisoryLock:
    """A deployment-wide lock (`key`) this process takes at its first chance and keeps while its connection lives."""

    def __init__(self, session_url: str, key: int):
        self._dsn = libpq_dsn(session_url)
        self.key = key
        self._connection = None

    def held(self) -> bool:
        """Whether this process holds the lock now: checked on the lock's session, else tried once.

        Raises when the database cannot be reached (the caller tries again later), after letting go of a
        connection that broke, so the lock is never believed held on a session that ended.
        """
        if self._connection is not None and not self._still_held():
            log.warning("the advisory lock %#x was lost with its session", self.key)
            self.release()
        if self._connection is None:
            self._connection = self._try_take()
        return self._connection is not None

    def _still_held(self) -> bool:
        try:
            return bool(self._connection.execute(_HELD, {"key": self.key}).fetchone()[0])
        except Exception:  # the session broke (a restart, a terminated backend): the lock went with it
            return False

    def _try_take(self):
        import psycopg

        connection = psycopg.connect(self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S)
        try:
            taken = connection.execute("SELECT pg_try_advisory_lock(%s::bigint)", (self.key,)).fetchone()[0]
        except BaseException:
            connection.close()
            raise
        if not taken:
            connection.close()  # someone else leads: no connection is kept for nothing
            return None
        return connection

    def release(self) -> None:
        """Ends the lock's session, and the lock with it."""
        if self._connection is not None:
            with contextlib.suppress(Exception):
                self._connection.close()
            self._connection = None
