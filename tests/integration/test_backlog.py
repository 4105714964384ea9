"""`item backlog` and KEDA's queries against a real ledger: claimable fresh and re-scores per version, in flight,
retries not due, exhausted checks, busy workers, and the workers wanted."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from worker.cli.main import app as item
from worker.ledger import checks
from worker.ledger.backlog import keda_queries, read_backlog
from worker.ledger.models import CheckRow, PipelineVersionRow, utcnow
from worker.ledger.states import Priority

MAX_ATTEMPTS = 5


def _version(session, version_id: str) -> None:
    session.add(PipelineVersionRow(id=version_id, profile="tiny", caption="c", ground="g", embed="e", head="h"))
    session.flush()


def _check(session, version_id: str, name: str, **state) -> str:
    row, _ = checks.create_check(session, external_id=name, pipeline_version_id=version_id, source={"url": "http://x/"})
    if state:
        session.execute(sa.update(CheckRow).where(CheckRow.id == row.id).values(**state))
    return row.id


def _running(owner: str, *, expires_in_s: float) -> dict:
    return {
        "status": "running", "attempts": 1, "lease_owner": owner, "lease_token": owner,
        "lease_expires_at": utcnow() + timedelta(seconds=expires_in_s),
    }  # fmt: skip


@pytest.fixture
def filled(ledger):
    """Version pv-a: 3 fresh due, 2 re-scores due, a retry not due, 3 in flight on two pods (one of them with two
    GPU loops), one whose lease expired, one with every attempt used, one done. Version pv-b: 2 fresh due."""
    with ledger.session() as session:
        _version(session, "pv-a")
        _version(session, "pv-b")
        for i in range(3):
            _check(session, "pv-a", f"fresh-{i}")
        for i in range(2):
            _check(session, "pv-a", f"rescore-{i}", priority=Priority.rescore)
        _check(session, "pv-a", "retry", attempts=1, available_at=utcnow() + timedelta(hours=1))
        _check(session, "pv-a", "gpu0", **_running("pod-1:11", expires_in_s=30))
        _check(session, "pv-a", "gpu1", **_running("pod-1:12", expires_in_s=30))
        _check(session, "pv-a", "other-pod", **_running("pod-2:7", expires_in_s=30))
        _check(session, "pv-a", "dead-worker", **_running("pod-3:1", expires_in_s=-5))
        _check(session, "pv-a", "poison", attempts=MAX_ATTEMPTS)
        _check(session, "pv-a", "done", status="done", finished_at=utcnow())
        for i in range(2):
            _check(session, "pv-b", f"b-{i}")
    return ledger


def test_the_backlog_counts_each_kind_of_waiting_per_version(filled):
    with filled.session() as session:
        found = read_backlog(session, max_attempts=MAX_ATTEMPTS)
    a, b = found.versions["pv-a"], found.versions["pv-b"]
    assert (a.fresh, a.rescore, a.expired_leases) == (4, 2, 1)  # the expired lease is claimable: fresh
    assert (a.running, a.not_due, a.exhausted) == (3, 1, 1)
    assert (b.fresh, b.rescore, b.running) == (2, 0, 0)
    assert found.claimable == 8
    assert found.busy_workers == 2  # pod-1 (two loops) and pod-2; pod-3's lease expired
    assert found.desired_workers(4) == 2  # two workers hold work, and 8 claimable fill two more's batches: max
    assert found.desired_workers(2) == 4
    assert found.desired_workers(100) == 2  # never fewer than the workers holding work
    assert found.desired_workers(100, minimum=3) == 3
    assert found.desired_workers(2, maximum=3) == 3


def test_narrowed_to_a_version(filled):
    with filled.session() as session:
        found = read_backlog(session, max_attempts=MAX_ATTEMPTS, versions=["pv-b"])
    assert list(found.versions) == ["pv-b"]
    assert (found.claimable, found.busy_workers) == (2, 0)


def test_an_idle_ledger_wants_no_worker(ledger):
    with ledger.session() as session:
        _version(session, "pv-a")
        _check(session, "pv-a", "done", status="done", finished_at=utcnow())
        found = read_backlog(session, max_attempts=MAX_ATTEMPTS)
    assert found.versions == {} and found.desired_workers(8) == 0


def test_item_backlog_json(filled, database_url, monkeypatch):
    monkeypatch.setenv("ITEM_DATABASE_URL", database_url)
    monkeypatch.setenv("ITEM_BATCH_SIZE", "2")
    monkeypatch.setenv("ITEM_WORKER_CONCURRENCY", "2")  # two GPU loops: 4 checks per worker
    result = CliRunner().invoke(item, ["backlog", "--json", "--max", "10"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["claimable"] == 8 and report["per_worker"] == 4 and report["desired_workers"] == 2
    assert report["versions"]["pv-a"]["not_due"] == 1 and report["versions"]["pv-b"]["fresh"] == 2
    text = CliRunner().invoke(item, ["backlog"])
    assert text.exit_code == 0 and "2 worker(s) wanted" in text.stdout


def test_keda_queries_count_what_item_backlog_counts(filled, database_url):
    if not database_url.startswith("postgresql"):
        pytest.skip("KEDA's PostgreSQL trigger runs on PostgreSQL")
    for versions, claimable, busy in ((None, 8, 2), (["pv-a"], 6, 2), (["pv-b"], 2, 0)):
        queries = keda_queries(max_attempts=MAX_ATTEMPTS, versions=versions)
        with filled.session() as session:
            assert session.execute(sa.text(queries["claimable"])).scalar_one() == claimable
            assert session.execute(sa.text(queries["busy"])).scalar_one() == busy
            found = read_backlog(session, max_attempts=MAX_ATTEMPTS, versions=versions)
        assert (found.claimable, found.busy_workers) == (claimable, busy)


def test_a_version_that_is_not_an_id_is_refused_not_quoted():
    for hostile in ("pv-a') OR (1=1", "x'; DROP TABLE checks; --", "a" * 65):
        with pytest.raises(ValueError, match="not a pipeline version id"):
            keda_queries(max_attempts=MAX_ATTEMPTS, versions=[hostile])
