"""The ledger's repository: every read and write the service makes, as short methods over a session.

Writes are safe to repeat, because Redis may deliver a message twice or a reconciler may re-send it:
inserts are INSERT ... ON CONFLICT DO NOTHING, and status changes are conditional UPDATEs that never leave a
terminal status. So a check has one row, and its first result is the one that stays.

`Ledger` holds the engine and the session factory; its operations are plain functions over a session, one
module per concern (`pipeline_versions`, `checks`, `claims`, `transitions`, `listing`, `rescores`, `images`),
offered here as methods so callers keep one object to pass around. The types callers name (`Lease`,
`NewCheck`, `Ending`, `RescoreSelection`) are re-exported from here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

from worker.ledger import checks, claims, images, listing, pipeline_versions, rescores, transitions
from worker.ledger.checks import NewCheck
from worker.ledger.claims import Lease
from worker.ledger.engine import make_engine
from worker.ledger.rescores import RescoreSelection
from worker.ledger.transitions import Ending

__all__ = ["Ending", "Lease", "Ledger", "LedgerTally", "NewCheck", "RescoreSelection"]


@dataclass
class LedgerTally:
    """What a piece of work (a worker's batch) cost the ledger: statements sent, and time in its transactions."""

    statements: int = 0
    ms: float = 0.0


class Ledger:
    """One database: an engine, a session factory, and the operations on checks, images and artifacts."""

    def __init__(self, database_url: str):
        self.engine = make_engine(database_url)
        # Rows stay readable after commit: callers hand them on after the session is closed.
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._tallies = threading.local()  # the tally of the transaction this thread is in, if it keeps one
        event.listen(self.engine, "before_cursor_execute", self._count_statement)

    @contextmanager
    def session(self, tally: LedgerTally | None = None) -> Iterator[Session]:
        """A transaction: committed when the block ends, rolled back if it raises; `tally` adds up its cost."""
        if tally is None:
            with self._sessions.begin() as session:
                yield session
            return
        started, self._tallies.current = time.perf_counter(), tally
        try:
            with self._sessions.begin() as session:
                yield session
        finally:
            self._tallies.current = None
            tally.ms += (time.perf_counter() - started) * 1000

    def _count_statement(self, *_args) -> None:
        tally = getattr(self._tallies, "current", None)
        if tally is not None:
            tally.statements += 1

    def dispose(self) -> None:
        """Closes the pooled connections (tests and short-lived commands)."""
        self.engine.dispose()

    # Each operation below is the module function itself: `ledger.claim(session, ...)` is `claims.claim(session, ...)`.

    # ------------------------------------------------------------------ pipeline versions
    ensure_pipeline_version = staticmethod(pipeline_versions.ensure_pipeline_version)
    activate_version = staticmethod(pipeline_versions.activate_version)
    active_version = staticmethod(pipeline_versions.active_version)
    versions = staticmethod(pipeline_versions.versions)
    checks_per_version = staticmethod(pipeline_versions.checks_per_version)

    # ------------------------------------------------------------------ creating and finding checks
    create_check = staticmethod(checks.create_check)
    create_checks = staticmethod(checks.create_checks)
    replace_check = staticmethod(checks.replace_check)
    get_check = staticmethod(checks.get_check)
    find_check = staticmethod(checks.find_check)
    checks_by_id = staticmethod(checks.checks_by_id)

    # ------------------------------------------------------------------ claims and leases
    claim = staticmethod(claims.claim)
    renew = staticmethod(claims.renew)
    release = staticmethod(claims.release)
    defer = staticmethod(claims.defer)

    # ------------------------------------------------------------------ how a claimed check ends
    mark_queued = staticmethod(transitions.mark_queued)
    finish_done = staticmethod(transitions.finish_done)
    finish_done_many = staticmethod(transitions.finish_done_many)
    end_many = staticmethod(transitions.end_many)
    finish_rejected = staticmethod(transitions.finish_rejected)
    finish_failed = staticmethod(transitions.finish_failed)
    abandoned_checks = staticmethod(transitions.abandoned_checks)
    fail_abandoned = staticmethod(transitions.fail_abandoned)

    # ------------------------------------------------------------------ listing and counting
    count_waiting = staticmethod(listing.count_waiting)
    stuck_checks = staticmethod(listing.stuck_checks)
    count_stuck = staticmethod(listing.count_stuck)
    list_checks = staticmethod(listing.list_checks)
    count_by_status = staticmethod(listing.count_by_status)
    dead_letters = staticmethod(listing.dead_letters)

    # ------------------------------------------------------------------ re-scoring
    rescore_candidates = staticmethod(rescores.rescore_candidates)
    create_rescores = staticmethod(rescores.create_rescores)
    rescore_progress = staticmethod(rescores.rescore_progress)

    # ------------------------------------------------------------------ images, blobs, artifacts and duplicates
    upsert_images = staticmethod(images.upsert_images)
    get_image = staticmethod(images.get_image)
    image_facts = staticmethod(images.image_facts)
    put_blob = staticmethod(images.put_blob)
    put_blobs = staticmethod(images.put_blobs)
    get_blobs = staticmethod(images.get_blobs)
    load_artifacts = staticmethod(images.load_artifacts)
    save_artifacts = staticmethod(images.save_artifacts)
    save_artifacts_many = staticmethod(images.save_artifacts_many)
    done_checks_for_images = staticmethod(images.done_checks_for_images)
