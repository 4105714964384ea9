"""The reconciler: what leases do not settle by themselves, once per deployment.

With leases a dead worker's checks are claimed again by any live worker of their version, so there is little
left to do here: checks that used every attempt and whose last worker died on them too (an input that kills
its worker each time) are failed `check.stuck`, since no claim will take them again; and checks nobody moves
(no live worker of their version, a version never started) are counted and logged for an operator, who decides.
It also deletes what is kept only for a while: thumbnails past ITEM_THUMBNAIL_RETENTION_DAYS, and expired console
sign-ins.

Every `item worker` runs it every `reconcile_interval_s`, but on PostgreSQL only the one holding the
deployment's advisory lock does (the lock is held for the life of its own connection, to
ITEM_DATABASE_SESSION_URL, so when that worker goes, another takes over at its next interval; see
`worker.ledger.leadership`). It runs on its own thread, never behind a queue of checks.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from worker.ledger import access, callback_secrets, outbox, retention, reviews
from worker.ledger.leadership import AdvisoryLock
from worker.ledger.store import Ledger
from worker.ops import metrics
from worker.ops.supervise import Supervised
from worker.settings import Settings

log = logging.getLogger("item.reconciler")

ADVISORY_LOCK = 0x17E4_0001  # any fixed number: every item deployment sharing a database shares this lock
STUCK_MESSAGE = "Every attempt ended with its worker gone (killed, out of memory): no worker finished this check."
FORGET_WORKERS_AFTER = timedelta(hours=1)  # a worker silent this long is gone: its row leaves the ledger


@dataclass(frozen=True)
class Reconciled:
    failed: int  # abandoned checks failed as check.stuck
    stuck: dict[str, int]  # unfinished checks nobody moved for reconcile_after_s, per status
    thumbnails_purged: int = 0  # older than thumbnail_retention_days
    sessions_purged: int = 0  # console sign-ins that expired


def reconcile(settings: Settings, ledger: Ledger) -> Reconciled:
    """One pass: fails the abandoned checks, counts the stuck ones, deletes what outlived its retention."""
    failed = []
    with ledger.session() as session:
        for check in ledger.abandoned_checks(session, settings.max_attempts):
            row = ledger.fail_abandoned(session, check.id, settings.max_attempts, "check.stuck", STUCK_MESSAGE)
            if row is not None:
                outbox.record_outcome(session, row, results_stream=bool(settings.results_stream))
                failed.append(row)
        stuck = ledger.count_stuck(session, timedelta(seconds=settings.reconcile_after_s))
    for row in failed:
        metrics.finished("failed", "check.stuck", row.created_at, row.tenant_id)
        about = {"check_id": row.id, "external_id": row.external_id, "stage": "reconcile", "code": "check.stuck"}
        log.warning("check failed: %s", STUCK_MESSAGE, extra=about)
    if any(stuck.values()):
        log.warning("unfinished checks no worker moved for %.0fs: %s", settings.reconcile_after_s, stuck)
    thumbnails, sessions = _purge(settings, ledger)
    return Reconciled(len(failed), stuck, thumbnails, sessions)


def _purge(settings: Settings, ledger: Ledger) -> tuple[int, int]:
    """Deletes old thumbnails, expired console sessions and callback secrets whose rotation window ended, in a
    transaction of their own: a large first purge must not hold the locks of the checks failed above. Returns how
    many thumbnails and sessions went."""
    with ledger.session() as session:
        thumbnails = reviews.purge_thumbnails(session, timedelta(days=settings.thumbnail_retention_days))
        sessions = access.purge_sessions(session)
        reviews.forget_workers(session, FORGET_WORKERS_AFTER)
        callback_secrets.purge_retired(session)  # sign no more: kept only until the next pass
    if thumbnails or sessions:
        log.info("deleted %d thumbnails past their retention and %d expired console sessions", thumbnails, sessions)
    return thumbnails, sessions


class ReconcilerThread:
    """Runs `reconcile` every `reconcile_interval_s` while this process leads the deployment."""

    def __init__(self, settings: Settings, ledger: Ledger):
        self.settings = settings
        self.ledger = ledger
        self._stopping = threading.Event()
        self._lock = AdvisoryLock(settings.session_database_url, ADVISORY_LOCK)
        self._was_leading = False
        self._maintained_at: float | None = None
        self._thread = Supervised("reconciler", self._run, stopping=self._stopping)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.stop(10)
        self._release()

    def _run(self) -> None:
        while not self._stopping.wait(self.settings.reconcile_interval_s):
            try:
                if self._leading():
                    reconcile(self.settings, self.ledger)
                    self._maintain_when_due()
            except Exception:  # the ledger is down, say: try again at the next interval
                log.warning("reconciling failed", exc_info=True)
                self._release()

    def _maintain_when_due(self) -> None:
        """Every `maintain_interval_s` (and first when this process starts leading): partitions ahead, expired
        days dropped (`worker.ledger.retention`)."""
        now = time.monotonic()
        if self._maintained_at is not None and now - self._maintained_at < self.settings.maintain_interval_s:
            return
        self._maintained_at = now
        report = retention.maintain(
            self.ledger.engine, retention.Policy.from_settings(self.settings), progress=log.debug
        )
        if report.made or report.dropped or report.kept:
            log.info("ledger maintenance: %s", report.to_dict())

    def _leading(self) -> bool:
        """Whether this process holds the deployment's lock (taken at the first chance, kept while it lives)."""
        if self.ledger.engine.dialect.name != "postgresql":
            return True  # SQLite: one host, and its processes queue on one file
        leading = self._lock.held()
        if leading and not self._was_leading:
            log.info("this worker runs the deployment's reconciler")
        self._was_leading = leading
        return leading

    def _release(self) -> None:
        self._lock.release()  # the lock's session ends, and the lock with it
        self._was_leading = False
