"""The ledger's repository: every read and write the service makes, as short methods over a session.

Writes are safe to repeat, because Redis may deliver a message twice or a reconciler may re-send it:
inserts are INSERT ... ON CONFLICT DO NOTHING, and status changes are conditional UPDATEs that never leave a
terminal status. So a check has one row, and its first result is the one that stays.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.orm import Session, aliased, sessionmaker

from pipeline.core import codec
from pipeline.core.results import Artifacts, PipelineVersion
from worker.ledger.engine import make_engine
from worker.ledger.models import (
    ArtifactRow,
    BlobRow,
    CheckRow,
    DeadLetterRow,
    ImageRow,
    PipelineVersionRow,
    new_id,
    utcnow,
)
from worker.ledger.queries import claim_rows, dialect_insert, fresh, in_chunks, insert_many
from worker.ledger.states import CheckStatus, Priority

if TYPE_CHECKING:  # decoding imports Pillow and numpy: the client side reads the ledger without them
    from pipeline.core.imaging import DecodedImage

_ACTIVE = (CheckStatus.queued, CheckStatus.running)


@dataclass(frozen=True)
class Lease:
    """A worker's hold on the checks it claimed: who holds them, the token every change must name, for how long.

    One lease per batch: the heartbeat renews it, and once it expires any worker may claim the checks again.
    """

    owner: str  # host:pid, for people reading the ledger
    token: str
    seconds: float

    @classmethod
    def new(cls, owner: str, seconds: float) -> Lease:
        return cls(owner, new_id(), seconds)


@dataclass(frozen=True)
class RescoreSelection:
    """Which finished checks a re-score takes; every field left None selects everything."""

    from_version: str | None = None  # only checks scored under this pipeline version
    since: datetime | None = None  # created at or after
    until: datetime | None = None  # created before
    verdict: str | None = None  # real, uncertain or fake
    min_score: float | None = None  # p_fake at or above
    max_score: float | None = None  # p_fake at or below
    external_ids: tuple[str, ...] | None = None  # only these (from a file)

    def conditions(self) -> list[sa.ColumnElement[bool]]:
        checks = CheckRow
        tests = [
            (self.from_version, lambda v: checks.pipeline_version_id == v),
            (self.since, lambda v: checks.created_at >= v),
            (self.until, lambda v: checks.created_at < v),
            (self.verdict, lambda v: checks.verdict == v),
            (self.min_score, lambda v: checks.p_fake >= v),
            (self.max_score, lambda v: checks.p_fake <= v),
            (self.external_ids, lambda v: checks.external_id.in_(v)),
        ]
        return [condition(value) for value, condition in tests if value is not None]


@dataclass(frozen=True)
class NewCheck:
    """A check to create: a platform's id for an image, where its bytes are, and where to send its result."""

    external_id: str
    source: dict
    callback_url: str | None = None


@dataclass(frozen=True)
class Ending:
    """How a check held by a lease ends when it cannot be scored: `status` rejected or failed, or queued again
    for a retry no earlier than `available_at`."""

    status: CheckStatus
    code: str | None  # None: a retry keeps the error already stored
    message: str | None
    available_at: datetime | None = None  # a retry only

    def values(self) -> dict:
        if self.status != CheckStatus.queued:
            return _ended_with_error(self.status, self.code, self.message)
        values = {"status": CheckStatus.queued, "enqueued_at": utcnow(), "available_at": self.available_at}
        values["lease_expires_at"] = None
        if self.code is not None:
            values |= {"error_code": self.code, "error_message": self.message}
        return values


# Unfinished checks no worker is moving (`item_checks_stuck`): running ones whose lease nobody renews and nobody
# took over, and fresh ones nobody claims (no live worker of their version). A queued re-score is left out:
# waiting behind fresh uploads for hours is its job.
_STUCK = sa.or_(
    CheckRow.status == CheckStatus.running,
    sa.and_(CheckRow.status == CheckStatus.queued, CheckRow.priority == Priority.fresh),
)
_MAX_EXTERNAL_ID = CheckRow.__table__.c.external_id.type.length


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

    # ------------------------------------------------------------------ pipeline versions

    def ensure_pipeline_version(
        self, session: Session, version: PipelineVersion, profile: str, *, activate: bool = True
    ) -> bool:
        """Registers the version once, as the active one unless told not to; later calls change nothing.

        Returns whether this call registered it. A version registered earlier keeps its activation state, so a
        worker restarted on an old head does not take new checks away from the version an operator activated.
        """
        now = utcnow()
        activated = now if activate else None
        row = {"id": version.id, "profile": profile, **version.stages, "created_at": now, "activated_at": activated}
        statement = dialect_insert(session, PipelineVersionRow).values(row).on_conflict_do_nothing()
        return session.execute(statement.returning(PipelineVersionRow.id)).scalar_one_or_none() is not None

    def activate_version(self, session: Session, version_id: str) -> PipelineVersionRow | None:
        """Makes a registered version the one new checks are made for (a rollback, or a staged rollout)."""
        statement = (
            sa.update(PipelineVersionRow)
            .where(PipelineVersionRow.id == version_id)
            .values(activated_at=utcnow())
            .returning(PipelineVersionRow)
        )
        return session.scalars(statement).one_or_none()

    def active_version(self, session: Session) -> PipelineVersionRow | None:
        """The most recently activated version: new checks and re-scores are made for it."""
        query = (
            sa.select(PipelineVersionRow)
            .where(PipelineVersionRow.activated_at.is_not(None))
            .order_by(PipelineVersionRow.activated_at.desc(), PipelineVersionRow.id)
            .limit(1)
        )
        return session.scalars(query).one_or_none()

    def versions(self, session: Session) -> list[PipelineVersionRow]:
        """Every registered version, oldest first."""
        query = sa.select(PipelineVersionRow).order_by(PipelineVersionRow.created_at, PipelineVersionRow.id)
        return list(session.scalars(query))

    def checks_per_version(self, session: Session) -> dict[str, dict[str, int]]:
        """{version id: {status: count}} over all checks."""
        query = sa.select(CheckRow.pipeline_version_id, CheckRow.status, sa.func.count()).group_by(
            CheckRow.pipeline_version_id, CheckRow.status
        )
        counts: dict[str, dict[str, int]] = {}
        for version_id, status, count in session.execute(query):
            counts.setdefault(version_id, {})[CheckStatus(status).value] = count
        return counts

    # ------------------------------------------------------------------ checks

    def create_check(
        self,
        session: Session,
        *,
        external_id: str,
        pipeline_version_id: str,
        source: dict,
        callback_url: str | None = None,
    ) -> tuple[CheckRow, bool]:
        """The check for (external_id, version), and whether this call created it (see `create_checks`)."""
        new = NewCheck(external_id, source, callback_url)
        return self.create_checks(session, pipeline_version_id, [new])[0]

    def create_checks(
        self, session: Session, pipeline_version_id: str, new: list[NewCheck]
    ) -> list[tuple[CheckRow, bool]]:
        """The check of each (external_id, version), and whether this call created it: two statements (an INSERT
        and a SELECT per IN_CHUNK checks), however many.

        Race-safe without locks: of two concurrent inserts, one wins and the other's ON CONFLICT DO NOTHING
        waits for it, then the SELECT reads the winner's row. An external id given twice is created once.
        """
        for one in new:
            if len(one.external_id) > _MAX_EXTERNAL_ID:  # PostgreSQL would refuse it and SQLite keep it
                raise ValueError(f"external_id is {len(one.external_id)} characters; the limit is {_MAX_EXTERNAL_ID}")
        now, created, rows = utcnow(), set(), {}
        first = list({one.external_id: one for one in reversed(new)}.values())  # the first of each id wins
        for chunk in in_chunks(first):
            values = [
                _queued_check(
                    now, external_id=one.external_id, pipeline_version_id=pipeline_version_id, source=one.source,
                    callback_url=one.callback_url,
                )
                for one in chunk
            ]  # fmt: skip
            statement = (
                dialect_insert(session, CheckRow)
                .on_conflict_do_nothing(index_elements=["external_id", "pipeline_version_id"])
                .returning(CheckRow.external_id)
            )
            created.update(session.scalars(statement, values))  # one executemany: see `insert_many`
            query = sa.select(CheckRow).where(
                CheckRow.pipeline_version_id == pipeline_version_id,
                CheckRow.external_id.in_([one.external_id for one in chunk]),
            )
            rows.update({row.external_id: row for row in session.scalars(fresh(query))})
        answers = []
        for one in new:
            if one.external_id not in rows:  # cannot happen: inserted, or conflicted with a committed row
                raise RuntimeError(f"check {one.external_id!r} under {pipeline_version_id} vanished after insert")
            answers.append((rows[one.external_id], one.external_id in created))
            created.discard(one.external_id)  # the same id again later in `new`: not created twice
        return answers

    def get_check(self, session: Session, check_id: str) -> CheckRow | None:
        return session.scalars(fresh(sa.select(CheckRow).where(CheckRow.id == check_id))).one_or_none()

    def find_check(self, session: Session, external_id: str, pipeline_version_id: str) -> CheckRow | None:
        query = sa.select(CheckRow).where(
            CheckRow.external_id == external_id, CheckRow.pipeline_version_id == pipeline_version_id
        )
        return session.scalars(fresh(query)).one_or_none()

    def claim(
        self,
        session: Session,
        *,
        pipeline_version_id: str,
        limit: int,
        lease: Lease,
        max_attempts: int,
        priority: int | None = None,
    ) -> list[CheckRow]:
        """Takes up to `limit` checks of one pipeline version for a batch, under `lease`: running, attempts + 1.

        Claimable are queued checks whose `available_at` has come (a retry waits out its backoff), and running
        ones whose lease expired (their worker died or stalled). Lower priorities go first (fresh uploads before
        re-scores), then the oldest, expired leases and queued checks alike; `priority` limits the claim to one
        priority. Rows another worker is claiming are skipped (see `claim_rows`), so two workers never share a
        check. Checks that used up `max_attempts` are left for the reconciler to fail: an image that kills its
        worker every time must not be claimed forever.

        On PostgreSQL queued and expired checks are picked apart, each from its own partial index in claim order
        (`ix_checks_claim_queued`, `ix_checks_claim_running`), so a claim reads about `limit` entries of each however
        long the backlog, instead of sorting every claimable check (see `claim_rows`).
        """
        now = utcnow()
        claimable = sa.and_(CheckRow.pipeline_version_id == pipeline_version_id, CheckRow.attempts < max_attempts)
        if priority is not None:
            claimable = sa.and_(claimable, CheckRow.priority == priority)
        return claim_rows(
            session,
            CheckRow,
            claimable=claimable,
            any_of=[_ready(now), _lease_expired(now)],
            order_by=[CheckRow.priority, CheckRow.created_at],
            limit=limit,
            values={
                "status": CheckStatus.running,
                "attempts": CheckRow.attempts + 1,
                "started_at": now,
                "updated_at": now,
                "lease_owner": lease.owner,
                "lease_token": lease.token,
                "lease_expires_at": now + timedelta(seconds=lease.seconds),
            },
        )

    def renew(self, session: Session, lease: Lease) -> int:
        """Extends the lease on every check still held under it; returns how many it holds."""
        now = utcnow()
        statement = (
            sa.update(CheckRow)
            .where(_held(lease.token))
            .values(lease_expires_at=now + timedelta(seconds=lease.seconds), updated_at=now)
        )
        return session.execute(statement).rowcount

    def release(self, session: Session, lease: Lease) -> int:
        """Gives back the checks still held under `lease` that were never run (a stopping worker's prefetched
        batch): queued and claimable at once, the attempt not counted. Returns how many."""
        now = utcnow()
        statement = (
            sa.update(CheckRow)
            .where(_held(lease.token))
            .values(status=CheckStatus.queued, attempts=CheckRow.attempts - 1, lease_expires_at=None, updated_at=now)
        )
        return session.execute(statement).rowcount

    def mark_queued(
        self,
        session: Session,
        check_id: str,
        token: str,
        *,
        available_at: datetime,
        error_code: str | None = None,
        error_message: str | None = None,
    ) -> CheckRow | None:
        """Back to queued for a retry, not claimable before `available_at`, recording why (an error left as None
        keeps the one already stored). Only the holder of the lease `token` can do it."""
        retry = Ending(CheckStatus.queued, error_code, error_message, available_at)
        return _one(self.end_many(session, token, {check_id: retry}))

    def finish_done(
        self,
        session: Session,
        check_id: str,
        token: str,
        *,
        image_sha256: str | None,
        p_fake: float,
        verdict: str,
        threshold: float,
        threshold_low: float | None = None,
        caption: str | None,
        objects: list[dict],
        object_count: int,
        timings_ms: dict | None,
        verdict_reason: str | None = "score",
        attribution: list[dict] | None = None,
        provenance: dict | None = None,
    ) -> CheckRow | None:
        """Stores the result if the lease `token` still holds the check; returns the finished row, else None.

        A worker that lost its lease (it stalled past it, and another took over) changes nothing. A retry's error
        is cleared: a done check's error columns would only mislead.
        """
        result = {
            "image_sha256": image_sha256,
            "p_fake": p_fake,
            "verdict": verdict,
            "threshold": threshold,
            "threshold_low": threshold_low,
            "caption": caption,
            "objects": objects,
            "object_count": object_count,
            "timings_ms": timings_ms,
            "verdict_reason": verdict_reason,
            "attribution": attribution,
            "provenance": provenance,
        }
        return _one(self.finish_done_many(session, token, {check_id: result}))

    def finish_done_many(self, session: Session, token: str, results: dict[str, dict]) -> list[CheckRow]:
        """`finish_done` for a batch, {check id: result}, in one statement; returns the rows this lease finished."""
        now = utcnow()
        ended = {"status": CheckStatus.done, "error_code": None, "error_message": None, "finished_at": now}
        rows = [{"id": check_id, **result, **ended, "lease_expires_at": None} for check_id, result in results.items()]
        return _transition_many(session, _held(token), rows)

    def end_many(self, session: Session, token: str, endings: dict[str, Ending]) -> list[CheckRow]:
        """Ends checks with an error or sends them back for a retry, {check id: ending}, in one statement per
        shape (ended, retried); returns the rows this lease changed. See `finish_rejected` and `mark_queued`."""
        rows = [{"id": check_id, **ending.values()} for check_id, ending in endings.items()]
        return _transition_many(session, _held(token), rows)

    def finish_rejected(
        self, session: Session, check_id: str, code: str, message: str, token: str | None = None
    ) -> CheckRow | None:
        """The input can never succeed (not an image, too large, refused URL). With `token`, only the holder of
        that lease can; without, only while the check was never claimed (the intake rejecting what it filed)."""
        return self._finish_with_error(session, check_id, CheckStatus.rejected, code, message, token)

    def finish_failed(self, session: Session, check_id: str, code: str, message: str, token: str) -> CheckRow | None:
        """Retries are used up; only the holder of the lease `token` can record it."""
        return self._finish_with_error(session, check_id, CheckStatus.failed, code, message, token)

    def _finish_with_error(
        self, session: Session, check_id: str, status: CheckStatus, code: str, message: str, token: str | None
    ) -> CheckRow | None:
        if token is not None:
            return _one(self.end_many(session, token, {check_id: Ending(status, code, message)}))
        return _transition(session, check_id, _never_claimed(), _ended_with_error(status, code, message))

    def abandoned_checks(self, session: Session, max_attempts: int, limit: int = 500) -> list[CheckRow]:
        """Running checks whose lease expired with every attempt used: each time, the worker died on them."""
        query = (
            sa.select(CheckRow)
            .where(_abandoned(max_attempts))
            .order_by(CheckRow.lease_expires_at, CheckRow.id)
            .limit(limit)
        )
        return list(session.scalars(fresh(query)))

    def fail_abandoned(
        self, session: Session, check_id: str, max_attempts: int, code: str, message: str
    ) -> CheckRow | None:
        """Fails an abandoned check (see `abandoned_checks`) unless a worker took it meanwhile."""
        values = _ended_with_error(CheckStatus.failed, code, message)
        return _transition(session, check_id, _abandoned(max_attempts), values)

    def count_waiting(self, session: Session) -> dict[str, int]:
        """Queued checks a worker may claim now, fresh uploads and re-scores apart (`item_checks_waiting`)."""
        names = {Priority.fresh: "fresh", Priority.rescore: "rescore"}
        query = (
            sa.select(CheckRow.priority, sa.func.count())
            .where(CheckRow.status == CheckStatus.queued, CheckRow.available_at <= utcnow())
            .group_by(CheckRow.priority)
        )
        counts = dict.fromkeys(names.values(), 0)
        counts.update({names.get(priority, str(priority)): int(n) for priority, n in session.execute(query)})
        return counts

    def stuck_checks(self, session: Session, older_than: timedelta, limit: int = 500) -> list[CheckRow]:
        """Unfinished checks untouched for `older_than`, oldest first: no worker is moving them (see _STUCK)."""
        query = (
            sa.select(CheckRow)
            .where(_STUCK, CheckRow.updated_at < utcnow() - older_than)
            .order_by(CheckRow.updated_at, CheckRow.id)
            .limit(limit)
        )
        return list(session.scalars(fresh(query)))

    def count_stuck(self, session: Session, older_than: timedelta) -> dict[str, int]:
        """Unfinished checks untouched for `older_than`, per status (for the metrics endpoint, at every scrape)."""
        query = (
            sa.select(CheckRow.status, sa.func.count())
            .where(_STUCK, CheckRow.updated_at < utcnow() - older_than)
            .group_by(CheckRow.status)
        )
        counts = {str(status): 0 for status in _ACTIVE}
        counts.update({str(status): int(n) for status, n in session.execute(query)})
        return counts

    def list_checks(
        self,
        session: Session,
        *,
        status: str | None = None,
        verdict: str | list[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        external_id: str | None = None,
        pipeline_version_id: str | None = None,
        p_fake_at_least: float | None = None,
        p_fake_below: float | None = None,
        after: tuple[datetime, str] | None = None,
        limit: int = 100,
    ) -> list[CheckRow]:
        """Checks newest first; `since` is inclusive and `until` exclusive, both on created_at.

        `after` is a page's cursor: the (created_at, id) of the last check of the previous page, so a page is
        an index range read however deep it is, and checks filed meanwhile never shift the pages.
        """
        query = sa.select(CheckRow).order_by(CheckRow.created_at.desc(), CheckRow.id.desc()).limit(limit)
        if external_id is not None:
            query = query.where(CheckRow.external_id == external_id)
        if pipeline_version_id is not None:
            query = query.where(CheckRow.pipeline_version_id == pipeline_version_id)
        if status is not None:
            query = query.where(CheckRow.status == CheckStatus(status))  # ValueError names a bad status
        if isinstance(verdict, str):
            query = query.where(CheckRow.verdict == verdict)
        elif verdict is not None:
            query = query.where(CheckRow.verdict.in_(verdict))
        if since is not None:
            query = query.where(CheckRow.created_at >= since)
        if until is not None:
            query = query.where(CheckRow.created_at < until)
        if p_fake_at_least is not None:
            query = query.where(CheckRow.p_fake >= p_fake_at_least)
        if p_fake_below is not None:
            query = query.where(CheckRow.p_fake < p_fake_below)
        if after is not None:
            moment, check_id = after
            query = query.where(
                sa.or_(CheckRow.created_at < moment, sa.and_(CheckRow.created_at == moment, CheckRow.id < check_id))
            )
        return list(session.scalars(fresh(query)))

    def count_by_status(self, session: Session) -> dict[str, int]:
        """Checks per status, every status present (zero included) so dashboards see stable keys."""
        counts = {status.value: 0 for status in CheckStatus}
        rows = session.execute(sa.select(CheckRow.status, sa.func.count()).group_by(CheckRow.status))
        for status, count in rows:
            counts[CheckStatus(status).value] = count
        return counts

    def done_checks_for_images(
        self, session: Session, sha256s: list[str], pipeline_version_id: str
    ) -> dict[str, CheckRow]:
        """The first finished check of each of these bytes under this version: its answer serves duplicates.

        One query per 500 images (IN_CHUNK) rather than one per check: a batch of re-scores asks for 64 at once.
        """
        first = {}
        for chunk in in_chunks(sorted(set(sha256s))):
            query = (
                sa.select(CheckRow)
                .where(
                    CheckRow.image_sha256.in_(chunk),
                    CheckRow.pipeline_version_id == pipeline_version_id,
                    CheckRow.status == CheckStatus.done,
                )
                .order_by(CheckRow.finished_at, CheckRow.id)
            )
            for row in session.scalars(fresh(query)):
                first.setdefault(row.image_sha256, row)
        return first

    # ------------------------------------------------------------------ re-scoring

    def rescore_candidates(
        self,
        session: Session,
        *,
        target_version_id: str,
        selection: RescoreSelection,
        after_external_id: str | None,
        limit: int,
    ) -> list[CheckRow]:
        """A page of finished checks to re-score under the target version, one per external id (its newest).

        Ordered by external id, so pages follow each other by keyset (`after_external_id`) however many millions
        there are; within an id, the most recently finished check comes first and the rest of its rows are dropped.
        """
        query = (
            sa.select(CheckRow)
            .where(CheckRow.status == CheckStatus.done, CheckRow.pipeline_version_id != target_version_id)
            .order_by(CheckRow.external_id, CheckRow.finished_at.desc(), CheckRow.id)
            .limit(limit)
        )
        for condition in selection.conditions():
            query = query.where(condition)
        if after_external_id is not None:
            query = query.where(CheckRow.external_id > after_external_id)
        newest: dict[str, CheckRow] = {}
        for row in session.scalars(fresh(query)):
            newest.setdefault(row.external_id, row)
        return list(newest.values())

    def create_rescores(
        self, session: Session, earlier: list[CheckRow], version_id: str
    ) -> tuple[dict[str, CheckRow], set[str]]:
        """Re-score checks of `earlier` under `version_id`, by external id, and the ids of those this call made.

        Ones that exist already (an earlier run, or a fresh upload under the new version) are kept as they are.

        The new check keeps the source, the callback and the image's sha256 (so stored artifacts are found without
        fetching the image), and points back at the check it re-scores.
        """
        if not earlier:
            return {}, set()
        now = utcnow()
        rows = [
            _queued_check(
                now,
                external_id=check.external_id,
                pipeline_version_id=version_id,
                source=check.source,
                callback_url=check.callback_url,
                image_sha256=check.image_sha256,
                priority=Priority.rescore,
                rescore_of=check.id,
            )
            for check in earlier
        ]
        statement = (
            dialect_insert(session, CheckRow)
            .values(rows)
            .on_conflict_do_nothing(index_elements=["external_id", "pipeline_version_id"])
            .returning(CheckRow.id)
        )
        created = set(session.scalars(statement))
        ids = [check.external_id for check in earlier]
        query = sa.select(CheckRow).where(CheckRow.pipeline_version_id == version_id, CheckRow.external_id.in_(ids))
        return {row.external_id: row for row in session.scalars(fresh(query))}, created

    def rescore_progress(
        self, session: Session, *, version_id: str, selection: RescoreSelection, through: str | None = None
    ) -> dict[tuple[str, str | None, str | None], int]:
        """How one re-score run stands: (status, earlier verdict, new verdict) → how many. One aggregate query.

        A run's re-scores are the re-score checks (`priority` rescore) under `version_id` of the checks `selection`
        takes, found by joining each to the check it re-scores (`rescore_of`), whose verdict comes along for free;
        a fresh upload under the version is none, whatever its external id. `through` keeps those of external ids
        up to the run's last page (pages go by external id). An ids selection's ids go as one parameter, however
        many: an IN (...) list of a million would not fit a statement.

        A run over most of the table reads all of it (on PostgreSQL, a parallel hash join of two scans: about
        0.1 s for 100k re-scores, seconds for a million); a narrow one (a limit, an ids file, a small version) goes
        by index: the (external id, version) key or `rescore_of`.
        """
        from dataclasses import replace

        rescore = aliased(CheckRow)
        query = (
            sa.select(rescore.status, CheckRow.verdict, rescore.verdict, sa.func.count())
            .join(rescore, rescore.rescore_of == CheckRow.id)
            .where(rescore.pipeline_version_id == version_id, rescore.priority == Priority.rescore)
            .where(*replace(selection, external_ids=None).conditions())
            .group_by(rescore.status, CheckRow.verdict, rescore.verdict)
        )
        if through is not None:
            query = query.where(rescore.external_id <= through)
        ids = selection.external_ids
        if ids is not None and session.get_bind().dialect.name == "postgresql":
            query = query.where(rescore.external_id == sa.any_(sa.bindparam("ids", list(ids), sa.ARRAY(sa.String))))
        elif ids is not None:
            listed = sa.func.json_each(sa.bindparam("ids", list(ids), sa.JSON)).table_valued("value")
            query = query.where(rescore.external_id.in_(sa.select(listed.c.value)))
        return {(status, before, after): n for status, before, after, n in session.execute(query)}

    def checks_by_id(self, session: Session, check_ids: list[str]) -> list[CheckRow]:
        rows = []
        for chunk in in_chunks(check_ids):
            rows += session.scalars(fresh(sa.select(CheckRow).where(CheckRow.id.in_(chunk))))
        return rows

    def dead_letters(self, session: Session, *, limit: int = 100) -> list[DeadLetterRow]:
        """Messages the intake could not file, newest first."""
        query = sa.select(DeadLetterRow).order_by(DeadLetterRow.received_at.desc(), DeadLetterRow.id).limit(limit)
        return list(session.scalars(query))

    # ------------------------------------------------------------------ images and blobs

    def upsert_images(self, session: Session, images: list[DecodedImage]) -> None:
        """Records decoded images once each, in one statement; the same bytes always decode the same, so nothing
        is ever updated."""
        now = utcnow()
        rows = {
            image.sha256: {
                "sha256": image.sha256,
                "n_bytes": image.n_bytes,
                "width": image.width,
                "height": image.height,
                "format": image.format,
                "created_at": now,
            }
            for image in images
        }
        insert_many(session, ImageRow, list(rows.values()))

    def put_blob(self, session: Session, sha256: str, data: bytes) -> None:
        self.put_blobs(session, {sha256: data})

    def put_blobs(self, session: Session, blobs: dict[str, bytes]) -> None:
        """Stores inline images by sha256, in one statement per IN_CHUNK of them; one already stored is kept."""
        insert_many(session, BlobRow, [{"sha256": sha256, "data": data} for sha256, data in blobs.items()])

    def get_blobs(self, session: Session, sha256s: list[str]) -> dict[str, bytes]:
        """The stored bytes of each of these blobs that exists, by sha256."""
        found = {}
        for chunk in in_chunks(sorted(set(sha256s))):
            query = sa.select(BlobRow.sha256, BlobRow.data).where(BlobRow.sha256.in_(chunk))
            found.update({sha256: data for sha256, data in session.execute(query)})
        return found

    # ------------------------------------------------------------------ artifacts

    def load_artifacts(self, session: Session, sha256s: list[str], versions: dict[str, str]) -> dict[str, Artifacts]:
        """For every sha256, the artifacts stored under exactly these version keys (kinds not stored stay None)."""
        found = {sha256: Artifacts() for sha256 in sha256s}
        wanted = {(kind, codec.version_hash(version)): version for kind, version in versions.items()}
        if not found or not wanted:
            return found
        key_match = sa.or_(*(sa.and_(ArtifactRow.kind == k, ArtifactRow.version_hash == h) for k, h in wanted))
        for chunk in in_chunks(list(found)):
            query = sa.select(ArtifactRow).where(ArtifactRow.sha256.in_(chunk), key_match)
            for row in session.scalars(query):
                if row.version == wanted[(row.kind, row.version_hash)]:  # a hash-prefix collision is not a match
                    codec.set_field(found[row.sha256], row.kind, codec.decode(row.kind, row.payload, row.vectors))
        return found

    def save_artifacts(self, session: Session, sha256: str, artifacts: Artifacts, versions: dict[str, str]) -> None:
        """Stores each artifact present under its version key; one already stored is left as it is."""
        self.save_artifacts_many(session, {sha256: (artifacts, versions)})

    def save_artifacts_many(self, session: Session, items: dict[str, tuple[Artifacts, dict[str, str]]]) -> None:
        """`save_artifacts` for many images, {sha256: (artifacts, version keys to store)}, in one statement."""
        now, rows = utcnow(), []
        for sha256, (artifacts, versions) in items.items():
            for kind, version in versions.items():
                value = codec.get_field(artifacts, kind)
                if value is None:
                    continue
                payload, vectors = codec.encode(kind, value)
                key = {"sha256": sha256, "kind": kind, "version_hash": codec.version_hash(version)}
                rows.append({**key, "version": version, "payload": payload, "vectors": vectors, "created_at": now})
        insert_many(session, ArtifactRow, rows)


def _queued_check(now: datetime, **fields) -> dict:
    """The row of a new check, queued now; `fields` names its upload, version and source (and re-score lineage)."""
    return {
        "id": new_id(),
        "status": CheckStatus.queued,
        "attempts": 0,
        "created_at": now,
        "enqueued_at": now,
        "available_at": now,
        "updated_at": now,
        **fields,
    }


def _ended_with_error(status: CheckStatus, code: str, message: str) -> dict:
    return {
        "status": status,
        "error_code": code,
        "error_message": message,
        "finished_at": utcnow(),
        "lease_expires_at": None,
    }


def _held(token: str) -> sa.ColumnElement[bool]:
    """The check is running under the lease `token` (expired or not: until another worker claims it, it is ours)."""
    return sa.and_(CheckRow.status == CheckStatus.running, CheckRow.lease_token == token)


def _never_claimed() -> sa.ColumnElement[bool]:
    return sa.and_(CheckRow.status == CheckStatus.queued, CheckRow.lease_token.is_(None))


def _ready(now: datetime) -> sa.ColumnElement[bool]:
    """Queued, and due (a retry waits out its backoff): what a claim finds in `ix_checks_claim_queued`."""
    return sa.and_(_status_is(CheckStatus.queued), CheckRow.available_at <= now)


def _lease_expired(now: datetime) -> sa.ColumnElement[bool]:
    """Running under a lease nobody renewed in time: what a claim finds in `ix_checks_claim_running`."""
    return sa.and_(_status_is(CheckStatus.running), CheckRow.lease_expires_at < now)


def _status_is(status: CheckStatus) -> sa.ColumnElement[bool]:
    """`status = 'queued'` with the value written into the SQL: with a bound value, PostgreSQL could not use the
    partial indexes (WHERE status = ...) in the generic plan it may keep for a statement the driver prepared."""
    return CheckRow.status == sa.literal(status.value, literal_execute=True)


def _abandoned(max_attempts: int) -> sa.ColumnElement[bool]:
    return sa.and_(
        _status_is(CheckStatus.running),  # the reconciler's scan reads `ix_checks_claim_running`
        CheckRow.lease_expires_at < utcnow(),
        CheckRow.attempts >= max_attempts,
    )


def _transition(session: Session, check_id: str, condition: sa.ColumnElement[bool], values: dict) -> CheckRow | None:
    """One conditional UPDATE: applies `values` only while the check meets `condition` (a status test).

    The condition is checked by the database in the same statement, so two workers finishing the same check
    cannot both win; the loser gets None and changes nothing.
    """
    statement = (
        sa.update(CheckRow)
        .where(CheckRow.id == check_id, condition)
        .values(**values, updated_at=utcnow())
        .returning(CheckRow)
        .execution_options(populate_existing=True)
    )
    return session.scalars(statement).one_or_none()


def _transition_many(session: Session, condition: sa.ColumnElement[bool], rows: list[dict]) -> list[CheckRow]:
    """`_transition` for many checks, each row {"id", column: value...}: on PostgreSQL one UPDATE ... FROM
    (VALUES ...) per shape of row (the same columns) and per IN_CHUNK rows, whatever the batch size."""
    if not rows:
        return []
    if session.get_bind().dialect.name != "postgresql":  # a local file: a statement costs no round trip
        changed = (_transition(session, row["id"], condition, _without_id(row)) for row in rows)
        return [row for row in changed if row is not None]
    shapes: dict[tuple[str, ...], list[dict]] = {}
    for row in rows:
        shapes.setdefault(tuple(row), []).append(row)
    return [
        changed
        for columns, same in shapes.items()
        for chunk in in_chunks(same)
        for changed in _update_from_values(session, condition, columns, chunk)
    ]


def _update_from_values(
    session: Session, condition: sa.ColumnElement[bool], columns: tuple[str, ...], rows: list[dict]
) -> list[CheckRow]:
    table = CheckRow.__table__
    incoming = sa.values(*(sa.column(name, table.c[name].type) for name in columns), name="incoming").data(
        [tuple(row[name] for name in columns) for row in rows]
    )
    # A VALUES list has no column types of its own: each value is cast to the type of the column it sets.
    assignments = {name: sa.cast(incoming.c[name], table.c[name].type) for name in columns if name != "id"}
    statement = (
        sa.update(CheckRow)
        .where(CheckRow.id == incoming.c.id, condition)
        .values(**assignments, updated_at=utcnow())
        .returning(CheckRow)
        .execution_options(populate_existing=True, synchronize_session=False)
    )
    return list(session.scalars(statement))


def _without_id(row: dict) -> dict:
    return {name: value for name, value in row.items() if name != "id"}


def _one(rows: list[CheckRow]) -> CheckRow | None:
    return rows[0] if rows else None
