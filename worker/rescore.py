"""Re-scoring what was already checked, under the active pipeline version, at low priority.

A re-score is an ordinary check under the new version, made from an earlier one: same external id, source and
callback, the image's sha256 already known, `priority` rescore and `rescore_of` pointing back. It is filed in
the ledger like any check, and workers claim re-scores only when no fresh upload is ready. So the worker's
usual machinery does the work: stored artifacts whose stage versions did not change are reused (a head-only
upgrade runs only the head; a CLIP upgrade keeps captions and boxes), and the unique (external id, version) key
makes a second run find everything done. Old results are never touched: each version keeps its own answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

from pipeline.core.errors import ItemError
from worker.ledger.models import CheckRow
from worker.ledger.states import TERMINAL_STATUSES, CheckStatus
from worker.ledger.store import Ledger, RescoreSelection
from worker.ledger.wakeups import notify_new_checks

PAGE = 500  # checks per ledger round trip (and per IN (...) list)


@dataclass
class RescoreRun:
    """One `item rescore`: what it selected, what it found already done, and the outcome as it comes in."""

    version_id: str
    selected: int = 0  # external ids selected (one re-score each)
    created: int = 0  # re-score checks this run made
    queued: int = 0  # re-scores waiting for a worker when this run filed them (an interrupted run's included)
    already_done: int = 0  # finished before this run started: a rerun skips them
    statuses: dict[str, str] = field(default_factory=dict)  # re-score check id → last status seen
    started: float = field(default_factory=time.monotonic)

    @property
    def total(self) -> int:
        return len(self.statuses)

    @property
    def finished(self) -> int:
        return sum(status in TERMINAL_STATUSES for status in self.statuses.values())

    @property
    def pending(self) -> list[str]:
        return [check_id for check_id, status in self.statuses.items() if status not in TERMINAL_STATUSES]

    def counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in CheckStatus}
        for status in self.statuses.values():
            counts[status] += 1
        return counts


@dataclass(frozen=True)
class Flips:
    """Verdicts that changed between a re-score and the check it re-scores (finished re-scores only)."""

    to_fake: int
    to_real: int
    compared: int

    @property
    def total(self) -> int:
        return self.to_fake + self.to_real


def target_version(ledger: Ledger) -> str:
    with ledger.session() as session:
        active = ledger.active_version(session)
    if active is None:
        raise ItemError("No pipeline version is registered yet: nothing can be re-scored.", code="version.none")
    return active.id


def queue(
    ledger: Ledger,
    selection: RescoreSelection,
    *,
    version_id: str,
    limit: int | None = None,
    on_page: Callable[[RescoreRun, list[str]], None] | None = None,
) -> RescoreRun:
    """Makes (or finds) the re-score check of every selected check, a page per transaction, and wakes the
    workers; `on_page` hears of each page with the ids of its re-scores still waiting.

    Resumable: checks a previous run made are found, not made again; finished ones are counted as done, and
    waiting ones simply wait (they are in the ledger, not in a message that could be lost).
    """
    run = RescoreRun(version_id)
    for page in _pages(ledger, selection, version_id, limit):
        with ledger.session() as session:
            targets, created = ledger.create_rescores(session, page, version_id)
            if created:
                notify_new_checks(session, version_id)
        run.created += len(created)
        waiting = []
        for target in targets.values():
            run.selected += 1
            run.statuses[target.id] = target.status
            if target.status in TERMINAL_STATUSES:
                run.already_done += 1
            elif target.status == CheckStatus.queued:
                waiting.append(target.id)
        run.queued += len(waiting)
        if on_page:
            on_page(run, waiting)
    return run


def count(ledger: Ledger, selection: RescoreSelection, *, version_id: str, limit: int | None = None) -> int:
    """How many checks `queue` would select (a dry run: nothing is written)."""
    return sum(len(page) for page in _pages(ledger, selection, version_id, limit))


def _pages(ledger: Ledger, selection: RescoreSelection, version_id: str, limit: int | None) -> Iterator[list[CheckRow]]:
    """Pages of checks to re-score, by external id; an ids file is taken a chunk at a time."""
    left = limit if limit is not None else float("inf")
    for chunk in _selections(selection):
        after = None
        while left > 0:
            with ledger.session() as session:
                page = ledger.rescore_candidates(
                    session,
                    target_version_id=version_id,
                    selection=chunk,
                    after_external_id=after,
                    limit=int(min(PAGE, left)),
                )
            if not page:
                break
            after = page[-1].external_id
            left -= len(page)
            yield page


def _selections(selection: RescoreSelection) -> Iterator[RescoreSelection]:
    ids = selection.external_ids
    if ids is None:
        yield selection
        return
    unique = sorted(set(ids))
    for start in range(0, len(unique), PAGE):
        yield replace(selection, external_ids=tuple(unique[start : start + PAGE]))


def refresh(ledger: Ledger, run: RescoreRun) -> RescoreRun:
    """Reads the status of every re-score not yet finished."""
    pending = run.pending
    with ledger.session() as session:
        for row in ledger.checks_by_id(session, pending):
            run.statuses[row.id] = row.status
    return run


def watch(
    ledger: Ledger,
    run: RescoreRun,
    *,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    on_progress: Callable[[RescoreRun], None] | None = None,
) -> bool:
    """Polls until every re-score finished (True) or the timeout passed (False)."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        refresh(ledger, run)
        if on_progress:
            on_progress(run)
        if not run.pending:
            return True
        if deadline is not None and time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)


def flips(ledger: Ledger, run: RescoreRun) -> Flips:
    """How many finished re-scores changed verdict, each compared with the check it re-scores."""
    with ledger.session() as session:
        pairs = ledger.verdict_changes(session, list(run.statuses))
    to_fake = sum(before != after and after == "fake" for before, after in pairs)
    to_real = sum(before != after and after == "real" for before, after in pairs)
    return Flips(to_fake, to_real, len(pairs))


def rate(run: RescoreRun) -> float:
    """Re-scores finished per second since the run started (the ones found done are not this run's work)."""
    elapsed = max(1e-9, time.monotonic() - run.started)
    return max(0, run.finished - run.already_done) / elapsed
