"""Re-score progress on a real ledger (both databases): one statement per poll however large the run, and numbers
that count this run's re-scores and nothing else.

No models run: the earlier checks are written finished, and re-scores are moved to their ends by hand, so the
numbers to expect are known beforehand.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from worker import rescore
from worker.ledger.models import CheckRow, PipelineVersionRow, utcnow
from worker.ledger.states import CheckStatus
from worker.ledger.store import Ledger, RescoreSelection

OLD, NEW = "pv-old", "pv-new"
ZEROS = {status.value: 0 for status in CheckStatus}


def _versions(ledger: Ledger) -> None:
    with ledger.session() as session:
        for version in (OLD, NEW):
            session.add(PipelineVersionRow(id=version, profile="tiny", caption="c", ground="g", embed="e", head="h"))


def _checked(ledger: Ledger, n: int) -> list[str]:
    """`n` checks done under OLD, `post-000`…: every third one (from the first) fake. Returns their external ids."""
    ids = [f"post-{i:03d}" for i in range(n)]
    rows = [
        {
            "external_id": external_id,
            "pipeline_version_id": OLD,
            "source": {"path": f"/images/{external_id}.png"},
            "status": CheckStatus.done,
            "verdict": "fake" if i % 3 == 0 else "real",
            "p_fake": 0.9 if i % 3 == 0 else 0.1,
            "finished_at": utcnow(),
        }
        for i, external_id in enumerate(ids)
    ]
    with ledger.session() as session:
        session.execute(sa.insert(CheckRow), rows)
    return ids


def _end(ledger: Ledger, external_id: str, status: CheckStatus, verdict: str | None = None) -> None:
    """The check of `external_id` under NEW ends with `status` (as a worker would end it)."""
    with ledger.session() as session:
        session.execute(
            sa.update(CheckRow)
            .where(CheckRow.external_id == external_id, CheckRow.pipeline_version_id == NEW)
            .values(status=status, verdict=verdict, finished_at=utcnow())
        )


@contextmanager
def _statements(ledger: Ledger) -> Iterator[list[str]]:
    """The statements sent meanwhile, by their first word; transaction control left out."""
    sent: list[str] = []

    def count(_connection, _cursor, statement, *_args) -> None:
        first = statement.split(None, 1)[0].upper()
        if first not in ("BEGIN", "COMMIT", "ROLLBACK"):
            sent.append(first)

    event.listen(ledger.engine, "before_cursor_execute", count)
    try:
        yield sent
    finally:
        event.remove(ledger.engine, "before_cursor_execute", count)


@pytest.mark.parametrize("pending", [1, 600])  # 600: more than one IN (...) list of ids
def test_a_progress_poll_is_one_statement_however_many_are_pending(ledger, pending):
    _versions(ledger)
    ids = _checked(ledger, pending)
    runs = {
        "everything": (RescoreSelection(), None),
        "an ids file": (RescoreSelection(external_ids=tuple(ids)), None),
        "an ids file cut by a limit": (RescoreSelection(external_ids=(*ids, "post-unknown")), pending),
    }
    for name, (selection, limit) in runs.items():
        run = rescore.queue(ledger, selection, version_id=NEW, limit=limit)
        with _statements(ledger) as polled:
            rescore.refresh(ledger, run)
        with _statements(ledger) as compared:
            flips = rescore.flips(ledger, run)
        assert polled == ["SELECT"] and compared == ["SELECT"], name
        assert (run.total, run.pending, flips.compared) == (pending, pending, 0), name


def test_progress_counts_done_failed_and_queued_rescores_but_no_fresh_upload(ledger):
    _versions(ledger)
    _checked(ledger, 10)  # post-000 … post-009 under OLD; 000, 003, 006 and 009 fake
    with ledger.session() as session:  # an upload under NEW of an id the selection takes: no re-score
        ledger.create_check(session, external_id="post-009", pipeline_version_id=NEW, source={"path": "/n.png"})
    run = rescore.queue(ledger, RescoreSelection(), version_id=NEW)
    assert (run.selected, run.created, run.queued, run.total) == (10, 9, 9, 9)

    for external_id, verdict in (("post-000", "real"), ("post-001", "fake"), ("post-002", "real")):
        _end(ledger, external_id, CheckStatus.done, verdict)
    _end(ledger, "post-003", CheckStatus.done, "fake")
    _end(ledger, "post-004", CheckStatus.failed)
    _end(ledger, "post-005", CheckStatus.failed)
    _end(ledger, "post-009", CheckStatus.done, "fake")  # the upload ends too: still not this run's
    rescore.refresh(ledger, run)

    assert run.counts() == {**ZEROS, "done": 4, "failed": 2, "queued": 3}
    assert (run.total, run.finished, run.pending) == (9, 6, 3)
    flips = rescore.flips(ledger, run)
    assert (flips.to_fake, flips.to_real, flips.compared) == (1, 1, 4)  # 001 real→fake, 000 fake→real


def test_a_rerun_counts_what_earlier_runs_left_and_overlapping_runs_count_their_own(ledger):
    _versions(ledger)
    _checked(ledger, 10)
    first = rescore.queue(ledger, RescoreSelection(), version_id=NEW, limit=4)  # interrupted: 000 … 003
    _end(ledger, "post-000", CheckStatus.done, "fake")
    _end(ledger, "post-001", CheckStatus.failed)
    assert rescore.refresh(ledger, first).counts() == {**ZEROS, "done": 1, "failed": 1, "queued": 2}

    rerun = rescore.queue(ledger, RescoreSelection(), version_id=NEW)  # resumes: 004 … 009 made, the rest found
    assert (rerun.created, rerun.already_done, rerun.queued) == (6, 2, 8)
    assert rescore.refresh(ledger, rerun).counts() == {**ZEROS, "done": 1, "failed": 1, "queued": 8}
    assert rescore.refresh(ledger, first).counts() == {**ZEROS, "done": 1, "failed": 1, "queued": 2}  # still its 4

    fakes = rescore.queue(ledger, RescoreSelection(verdict="fake"), version_id=NEW)  # 000, 003, 006, 009
    assert rescore.refresh(ledger, fakes).counts() == {**ZEROS, "done": 1, "queued": 3}
    listed = RescoreSelection(external_ids=("post-001", "post-003", "post-008", "post-unknown"))
    cut = rescore.queue(ledger, listed, version_id=NEW, limit=2)  # 001 and 003
    assert rescore.refresh(ledger, cut).counts() == {**ZEROS, "failed": 1, "queued": 1}
