"""Reads that may be a little stale go to a read-only follower of the ledger (ITEM_DATABASE_REPLICA_URL).

The rule, in one sentence: a GET that reads checks, decisions, versions or the operations figures reads the
replica, unless the same visitor wrote within READ_OWN_WRITES_S (every write's answer sets the `item_wrote`
cookie for that long), and a 404 is never the replica's word (a row it has not received yet is looked up on
the primary). Everything else reads the primary: writes and what they read, keys, console sessions and their
CSRF tokens (a revoked key must stop working at once, not when a lagging replica catches up).

A replica that cannot be reached is not an outage: the read runs on the primary, with a warning and
`item_replica_fallbacks_total{reason="unreachable"}`, and the replica is left alone for RETRY_AFTER_S so that
every request does not wait for its connect timeout.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

import sqlalchemy as sa
from fastapi import Request
from fastapi.responses import Response
from sqlalchemy import event
from sqlalchemy.orm import Session

from worker.ledger.engine import INFRASTRUCTURE_ERRORS
from worker.ledger.store import Ledger
from worker.ops import metrics
from worker.web.errors import HttpError

log = logging.getLogger("item.web")
T = TypeVar("T")

WROTE_COOKIE = "item_wrote"
# Longer than a healthy follower's replay lag (well under a second), short enough that a visitor who wrote
# once is back on the replica by the next page they open on purpose rather than by redirect.
READ_OWN_WRITES_S = 10
RETRY_AFTER_S = 5.0  # after a failure: an outage costs one connect timeout per process this often, not per request
CONNECT_TIMEOUT_S = 2  # libpq's smallest: a replica that does not answer must not hold a page for long
WRITES = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class Reads:
    """Where a read that may be stale runs: the replica when one is set and the rule allows, else the primary."""

    def __init__(self, primary: Ledger, replica_url: str | None):
        self.primary = primary
        self.replica = _replica_ledger(replica_url) if replica_url else None
        self._resting_until = 0.0  # the replica is not tried before this (time.monotonic())

    def run(self, request: Request, read: Callable[[Session], T]) -> T:
        """`read` in a transaction on the replica where this request may use it, else (or if the replica cannot
        be reached, or answers 404) on the primary. A read runs twice at most, so it must write nothing."""
        if not self._may_use_replica(request):
            return _on(self.primary, read)
        try:
            answer = _on(self.replica, read)
        except INFRASTRUCTURE_ERRORS as error:
            self._rest(error)
        except HttpError as error:
            if error.status != 404:
                raise
            metrics.REPLICA_FALLBACKS.labels("not_found").inc()
        else:
            if not _is_not_found(answer):
                return answer
            metrics.REPLICA_FALLBACKS.labels("not_found").inc()
        return _on(self.primary, read)

    def dispose(self) -> None:
        if self.replica is not None:
            self.replica.dispose()

    def _may_use_replica(self, request: Request) -> bool:
        if self.replica is None or WROTE_COOKIE in request.cookies:
            return False
        if time.monotonic() < self._resting_until:
            metrics.REPLICA_FALLBACKS.labels("unreachable").inc()
            return False
        return True

    def _rest(self, error: Exception) -> None:
        self._resting_until = time.monotonic() + RETRY_AFTER_S
        metrics.REPLICA_FALLBACKS.labels("unreachable").inc()
        reason = getattr(error, "orig", None) or error  # the driver's words, without the statement SQLAlchemy adds
        log.warning("the read replica is unreachable (%s); reading the primary for %.0f s", reason, RETRY_AFTER_S)


def _on(ledger: Ledger, read: Callable[[Session], T]) -> T:
    with ledger.session() as session:
        return read(session)


def _is_not_found(answer: object) -> bool:
    return isinstance(answer, Response) and answer.status_code == 404


def _replica_ledger(url: str) -> Ledger:
    """A Ledger on the follower: a short connect timeout, and every transaction READ ONLY, so a read that
    writes by mistake fails here as it would on a hot standby rather than writing to a writable copy."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "postgresql" and "connect_timeout" not in parsed.query:
        parsed = parsed.update_query_dict({"connect_timeout": str(CONNECT_TIMEOUT_S)})
    ledger = Ledger(parsed.render_as_string(hide_password=False))
    if ledger.engine.dialect.name == "postgresql":
        event.listen(ledger.engine, "connect", _read_only)
    return ledger


def _read_only(dbapi_connection, _record) -> None:
    dbapi_connection.read_only = True  # psycopg opens every transaction with BEGIN READ ONLY


class MarksWrites:
    """Sets the `item_wrote` cookie on the answer to every write, so the visitor's next reads for
    READ_OWN_WRITES_S go to the primary and show what they just did (the page a decision redirects to)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in WRITES:
            return await self.app(scope, receive, send)
        cookie = f"{WROTE_COOKIE}=1; Max-Age={READ_OWN_WRITES_S}; Path=/; HttpOnly; SameSite=Strict"
        if scope.get("scheme") == "https":
            cookie += "; Secure"

        async def marked(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"set-cookie", cookie.encode())]
            await send(message)

        await self.app(scope, receive, marked)
