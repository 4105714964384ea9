"""Engines for the ledger, set up so the same code behaves the same on PostgreSQL and SQLite."""

from __future__ import annotations

import time
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.exc import InterfaceError, OperationalError

SQLITE_BUSY_TIMEOUT_MS = 30_000
IDLE_PING_S = 1.0  # a connection unused for longer is checked before use; one in steady use never is

# The ledger is unreachable: nothing can be recorded. Only connection-level errors: a programming error tried
# again would just fail again, forever.
INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError, ConnectionError, TimeoutError)

# psycopg 3 prepares a statement on the server once it ran 5 times on a connection. Behind PgBouncer in transaction
# mode (before 1.21, and Debian's is 1.18) the next transaction may run on another server session, which never
# saw it: "prepared statement _pg3_0 does not exist". Off everywhere, not behind a setting one could forget:
# measured on this machine the saving is 0.2-0.4 ms per statement against transactions of 4-10 ms (their
# commits), and every ledger transaction carries a batch; each statement is then planned for its own values.
NO_PREPARED_STATEMENTS = {"prepare_threshold": None}


def normalize_url(url: str | sa.URL) -> sa.URL:
    """Plain `postgresql://` (and `postgres://`) URLs get psycopg 3, the driver installed, not psycopg2."""
    parsed = sa.make_url(url) if isinstance(url, str) else url
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | sa.URL, *, foreign_keys: bool = True) -> sa.Engine:
    """An engine; for SQLite also the setup several processes need.

    No liveness check (`pool_pre_ping`) on every checkout: it would cost a round trip per transaction, and a
    worker's batches reuse one connection within milliseconds. Only a connection idle for IDLE_PING_S is pinged
    (see `_ping_when_idle`); for the rest, every caller treats a broken connection as an outage and tries
    again, and SQLAlchemy drops the whole pool when one connection turns out dead.

    `foreign_keys=False` is for migrations: SQLite batch migrations copy and drop tables, which enforced
    foreign keys would refuse.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() != "sqlite":
        # The hot connection is the one reused; no server-side prepared statements (see NO_PREPARED_STATEMENTS).
        engine = sa.create_engine(parsed, pool_use_lifo=True, connect_args=NO_PREPARED_STATEMENTS)
        _ping_when_idle(engine)
        return engine
    _make_parent_folder(parsed)
    engine = sa.create_engine(parsed)
    _configure_sqlite(engine, foreign_keys=foreign_keys)
    return engine


def _ping_when_idle(engine: sa.Engine) -> None:
    """A pooled connection unused for IDLE_PING_S is checked with `SELECT 1` before it is handed out, and
    replaced if the database dropped it meanwhile (a restart, an idle timeout, a terminated backend): the loops
    that wake up now and then (heartbeats, deliveries, an idle worker's claim) then never start on a dead one."""

    @event.listens_for(engine, "checkin")
    def _checked_in(_dbapi_connection, record) -> None:
        record.info["checked_in_at"] = time.monotonic()

    @event.listens_for(engine, "checkout")
    def _checked_out(dbapi_connection, record, _proxy) -> None:
        if time.monotonic() - record.info.get("checked_in_at", time.monotonic()) < IDLE_PING_S:
            return
        try:
            cursor = dbapi_connection.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
            dbapi_connection.rollback()  # the driver opened a transaction for the ping: leave none behind
        except Exception as error:
            raise sa.exc.DisconnectionError("the pooled connection was dropped while idle") from error


def _make_parent_folder(url: sa.URL) -> None:
    """SQLite creates the file but not its folder (the default ledger lives under ~/.local/share/item)."""
    database = url.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _configure_sqlite(engine: sa.Engine, *, foreign_keys: bool) -> None:
    """WAL lets readers run beside the one writer; the busy timeout makes writers wait instead of failing.

    Every transaction starts with BEGIN IMMEDIATE, taking the write lock up front. With the driver's default
    deferred BEGIN, a transaction that reads and then writes fails at once with "database is locked" when
    another process wrote in between (the busy timeout does not apply to that case); with IMMEDIATE it waits.
    """

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # the driver emits no BEGIN of its own; `_on_begin` does
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: sa.Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def libpq_dsn(url: str | sa.URL) -> str:
    """The URL as psycopg.connect takes it, for the few connections made outside the pool (LISTEN, the lock)."""
    parsed = sa.make_url(url) if isinstance(url, str) else url
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)
