"""Re-scoring what was already checked under the active pipeline version, from its own low-priority queue.

A re-score is an ordinary check under the new version, made from an earlier one: same external id, source and
callback, the image's sha256 already known, `priority` rescore and `rescore_of` pointing back. So the worker's
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

PAGE = 500  # checks per ledger round trip (and per IN (...) list)


@dataclass
class RescoreRun:
    """One `item rescore`: what it selected, what it found already done, and the outcome as it comes in."""

    version_id: str
    selected: int = 0  # external ids selected (one re-score each)
    created: int = 0  # re-score checks this run made
    sent: int = 0  # messages this run sent (new checks, and queued ones left by an interrupted run)
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
    send: Callable[[list[dict]], None],
    *,
    version_id: str,
    limit: int | None = None,
    on_page: Callable[[RescoreRun], None] | None = None,
) -> RescoreRun:
    """Makes (or finds) the re-score check of every selected check and sends the ones still queued.

    Resumable: checks a previous run made are found, not made again; finished ones are counted as done and
    queued ones are sent again (a message that duplicates one still in Redis is harmless: the ledger decides).
    """
    run = RescoreRun(version_id)
    for page in _pages(ledger, selection, version_id, limit):
        with ledger.session() as session:
            targets, created = ledger.create_rescores(session, page, version_id)
        run.created += len(created)
        messages = []
        for external_id, target in targets.items():
            run.selected += 1
            run.statuses[target.id] = target.status
            if target.status in TERMINAL_STATUSES:
                run.already_done += 1
            elif target.status == CheckStatus.queued:
                messages.append({"external_id": external_id, "image": target.source, "check_id": target.id})
        send(messages)
        run.sent += len(messages)
        if on_page:
            on_page(run)
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
