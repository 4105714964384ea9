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
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from pipeline.core.errors import ItemError
from worker.ledger.models import CheckRow
from worker.ledger.states import TERMINAL_STATUSES, CheckStatus, Priority
from worker.ledger.store import Ledger, RescoreSelection
from worker.ledger.wakeups import notify_new_checks

PAGE = 500  # checks per ledger round trip (and per IN (...) list)
# A progress read is one aggregate over the whole run (seconds for a million on a busy ledger): `watch` waits at
# least this many times as long as the last one took, so reading progress never becomes the ledger's main work.
READ_SHARE_PAUSE = 9


@dataclass
class RescoreRun:
    """One `item rescore`: what it selected, what it found already done, and the outcome as it comes in.

    Counts only, never an entry per re-score: however many there are, `refresh` reads how they stand with one
    aggregate query. The run's re-scores are the re-score checks under `version_id` of the checks `selection`
    takes (joined through `rescore_of`: see `Ledger.rescore_progress`) that the run reached. Pages go by external
    id, so `through`, the last one reached, bounds them: a run a limit stopped, or one still queueing, counts what
    it reached and no further. An ids file's ids need not follow the database's order of external ids, so its run
    keeps the ids it reached instead (it holds the file's ids anyway).

    So a rerun of the selection counts the re-scores an earlier run left, queued or done; a fresh upload under the
    version is never counted, whatever its external id (it is no re-score). Two runs whose selections overlap both
    count the re-scores of the checks both select, each as its own. A re-score an earlier run made for another
    check of the same external id (another selection's pick of it) is found and tallied while queueing, but once
    progress is read it is this run's only if this selection takes that check too.
    """

    version_id: str
    selection: RescoreSelection = field(default_factory=RescoreSelection)
    through: str | None = None  # the last external id reached (an ids file's run keeps `reached_ids` instead)
    reached_ids: list[str] | None = None  # an ids file's run: the ids it reached
    selected: int = 0  # external ids selected (one re-score each, or a fresh upload under the version already)
    created: int = 0  # re-score checks this run made
    queued: int = 0  # re-scores waiting for a worker when this run filed them (an interrupted run's included)
    already_done: int = 0  # finished before this run started: a rerun skips them
    status_counts: Counter[str] = field(default_factory=Counter)  # re-scores per status, as last read
    started: float = field(default_factory=time.monotonic)

    @property
    def total(self) -> int:
        return sum(self.status_counts.values())

    @property
    def finished(self) -> int:
        return sum(self.status_counts[status] for status in TERMINAL_STATUSES)

    @property
    def pending(self) -> int:
        return self.total - self.finished

    def counts(self) -> dict[str, int]:
        return {status.value: self.status_counts[status] for status in CheckStatus}

    def scope(self) -> RescoreSelection:
        """The selection, an ids file's narrowed to the ids the run reached."""
        if self.reached_ids is None:
            return self.selection
        return replace(self.selection, external_ids=tuple(self.reached_ids))


@dataclass(frozen=True)
class Flips:
    """Verdicts that changed between a re-score and the check it re-scores (finished re-scores only)."""

    to_fake: int
    to_real: int
    compared: int
    to_uncertain: int = 0  # into the band of a head that has one

    @property
    def total(self) -> int:
        return self.to_fake + self.to_real + self.to_uncertain


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
    run = RescoreRun(version_id, selection, reached_ids=None if selection.external_ids is None else [])
    for page in _pages(ledger, selection, version_id, limit):
        with ledger.session() as session:
            targets, created = ledger.create_rescores(session, page, version_id)
            if created:
                notify_new_checks(session, version_id)
        _reached(run, page)
        run.created += len(created)
        waiting = _tally(run, targets.values())
        if on_page:
            on_page(run, waiting)
    return run


def _reached(run: RescoreRun, page: list[CheckRow]) -> None:
    """Moves what the run reached past `page` (see `RescoreRun`)."""
    if run.reached_ids is None:
        run.through = page[-1].external_id
    else:
        run.reached_ids += [check.external_id for check in page]


def _tally(run: RescoreRun, targets: Iterable[CheckRow]) -> list[str]:
    """Counts a page's checks under the version into the run (progress before the first `refresh`); returns the
    ids of the re-scores waiting. A fresh upload under the version is selected, but it is no re-score."""
    waiting = []
    for target in targets:
        run.selected += 1
        if target.priority != Priority.rescore:
            continue
        run.status_counts[target.status] += 1
        if target.status in TERMINAL_STATUSES:
            run.already_done += 1
        elif target.status == CheckStatus.queued:
            waiting.append(target.id)
    run.queued += len(waiting)
    return waiting


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
    """Reads how the run's re-scores stand: one aggregate query, however many there are."""
    run.status_counts = Counter()
    for (status, _, _), count in _outcomes(ledger, run).items():
        run.status_counts[status] += count
    return run


def watch(
    ledger: Ledger,
    run: RescoreRun,
    *,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    on_progress: Callable[[RescoreRun], None] | None = None,
) -> bool:
    """Polls until every re-score finished (True) or the timeout passed (False); each poll is one query."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        read_at = time.monotonic()
        refresh(ledger, run)
        pause = max(poll_s, READ_SHARE_PAUSE * (time.monotonic() - read_at))
        if on_progress:
            on_progress(run)
        if not run.pending:
            return True
        if deadline is not None:
            if time.monotonic() >= deadline:
                return False
            pause = min(pause, deadline - time.monotonic())
        time.sleep(max(0.0, pause))


def flips(ledger: Ledger, run: RescoreRun) -> Flips:
    """How many finished re-scores changed verdict, each compared with the check it re-scores (one query)."""
    outcomes = _outcomes(ledger, run).items()
    done = {(before, after): count for (status, before, after), count in outcomes if status == CheckStatus.done}
    to_fake = sum(count for (before, after), count in done.items() if before != after and after == "fake")
    to_real = sum(count for (before, after), count in done.items() if before != after and after == "real")
    to_uncertain = sum(n for (before, after), n in done.items() if before != after and after == "uncertain")
    return Flips(to_fake, to_real, sum(done.values()), to_uncertain)


def _outcomes(ledger: Ledger, run: RescoreRun) -> dict[tuple[str, str | None, str | None], int]:
    with ledger.session() as session:
        return ledger.rescore_progress(session, version_id=run.version_id, selection=run.scope(), through=run.through)


def rate(run: RescoreRun) -> float:
    """Re-scores finished per second since the run started (the ones found done are not this run's work)."""
    elapsed = max(1e-9, time.monotonic() - run.started)
    return max(0, run.finished - run.already_done) / elapsed
