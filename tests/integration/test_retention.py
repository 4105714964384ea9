"""A ledger that runs for a year, on PostgreSQL (partitions) and SQLite (plain tables): days made ahead, expired
days dropped whole with checks archived first, and idempotency that holds across days."""

from __future__ import annotations

import json
import re
from datetime import timedelta

import pytest
import sqlalchemy as sa

from pipeline.core.results import PipelineVersion
from worker.ledger import archive, partitions
from worker.ledger.checks import file_rows, made_at, queued_check
from worker.ledger.models import BlobRow, CheckKeyRow, CheckRow, DeadLetterRow, DeliveryRow, utcnow
from worker.ledger.retention import Policy, ensure_partitions, maintain
from worker.ledger.states import CheckStatus
from worker.ledger.store import Ledger

VERSION = PipelineVersion(caption="blip:a", ground="gdino:b", embed="clip:c", head="head:retention")
KEEP_DAYS = {table: 10 for table in partitions.PARTITIONED}


@pytest.fixture
def ledger_v(ledger: Ledger) -> Ledger:
    with ledger.session() as session:
        ledger.ensure_pipeline_version(session, VERSION, "tiny")
    return ledger


def _file_on(ledger: Ledger, days_ago: int, external_ids: list[str], *, status: CheckStatus = CheckStatus.done):
    """Checks filed `days_ago` (their keys and ids of that day too), each ended with `status`, with a delivery,
    a blob and a dead letter of that day."""
    at = utcnow() - timedelta(days=days_ago)
    _make_days(ledger, at.date())
    rows = [queued_check(at, external_id=one, pipeline_version_id=VERSION.id, source={"url": "https://x/"})
            for one in external_ids]  # fmt: skip
    with ledger.session() as session:
        found, _ = file_rows(session, VERSION.id, rows)
        ids = [row.id for row in found.values()]
        session.execute(sa.update(CheckRow).where(CheckRow.id.in_(ids)).values(status=status, verdict="real"))
        for row in found.values():
            session.add(DeliveryRow(check_id=row.id, check_created_at=row.created_at, target="stream", body={}))
            session.add(BlobRow(sha256=row.id.replace("-", "").ljust(64, "0"), data=b"x", created_at=at))
            session.add(DeadLetterRow(code="message.invalid", reason="test", received_at=at))
    return found


def _make_days(ledger: Ledger, day) -> None:
    with ledger.engine.begin() as connection:
        if partitions.is_partitioned(connection):
            partitions.ensure_days(connection, day, day)


def _count(ledger: Ledger, model) -> int:
    with ledger.session() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(model))


def test_partitions_are_made_ahead_and_again_idempotently(ledger_v):
    with ledger_v.engine.connect() as connection:
        if not partitions.is_partitioned(connection):
            pytest.skip("SQLite keeps plain tables")
    made = ensure_partitions(ledger_v.engine, ahead_days=6)
    today = partitions.today()
    with ledger_v.engine.connect() as connection:
        for table in partitions.PARTITIONED:
            days = set(partitions.partition_days(connection, table))
            assert {today + timedelta(days=n) for n in range(-1, 7)} <= days, table
    assert made  # the migration made three days ahead; six asked for more
    assert ensure_partitions(ledger_v.engine, ahead_days=6) == []


def test_expired_days_go_whole_and_checks_are_archived_first(ledger_v, tmp_path):
    old = _file_on(ledger_v, 30, [f"old-{n}" for n in range(5)])
    recent = _file_on(ledger_v, 2, [f"recent-{n}" for n in range(3)])
    before = {model: _count(ledger_v, model) for model in (CheckRow, CheckKeyRow, DeliveryRow, BlobRow, DeadLetterRow)}
    policy = Policy(KEEP_DAYS, tmp_path / "archive")

    dry = maintain(ledger_v.engine, policy, dry_run=True, progress=lambda _line: None)
    assert {label.split()[0] for label in dry.dropped} >= {"checks", "check_keys", "deliveries", "blobs"}
    assert {model: _count(ledger_v, model) for model in before} == before  # a dry run changes nothing

    report = maintain(ledger_v.engine, policy, progress=lambda _line: None)
    assert _count(ledger_v, CheckRow) == before[CheckRow] - 5
    for model in (CheckKeyRow, DeliveryRow, BlobRow, DeadLetterRow):
        assert _count(ledger_v, model) == before[model] - 5, model
    [path] = report.archived
    archived = list(archive.read_archive(path))
    assert sorted(row["external_id"] for row in archived) == sorted(old)
    assert all(row["status"] == "done" and row["id"] == old[row["external_id"]].id for row in archived)
    with ledger_v.session() as session:  # what is kept still reads by id
        assert ledger_v.get_check(session, recent["recent-0"].id).external_id == "recent-0"
    again = maintain(ledger_v.engine, policy, progress=lambda _line: None)
    assert again.dropped == [] and again.archived == []


def test_checks_stay_without_an_archive_or_while_unfinished(ledger_v, tmp_path):
    _file_on(ledger_v, 40, ["waiting"], status=CheckStatus.queued)
    _file_on(ledger_v, 35, ["finished"])
    kept = maintain(ledger_v.engine, Policy(KEEP_DAYS, None), progress=lambda _line: None).kept
    assert len(kept) == 2 and all("ITEM_ARCHIVE_DIR" in line for line in kept)
    report = maintain(ledger_v.engine, Policy(KEEP_DAYS, tmp_path), progress=lambda _line: None)
    assert len(report.archived) == 1 and len(report.kept) == 1 and "unfinished" in report.kept[0]
    with ledger_v.session() as session:
        assert [row.external_id for row in session.scalars(sa.select(CheckRow))] == ["waiting"]


def test_an_external_id_filed_again_on_a_later_day_gets_its_first_check(ledger_v):
    first = _file_on(ledger_v, 1, ["meme"], status=CheckStatus.queued)["meme"]
    with ledger_v.session() as session:
        [(again, created)] = ledger_v.create_checks(session, VERSION.id, [_new("meme")])
        [(fresh, made)] = ledger_v.create_checks(session, VERSION.id, [_new("other")])
    assert (again.id, created) == (first.id, False)
    assert made and fresh.created_at.date() == utcnow().date() != first.created_at.date()
    with ledger_v.session() as session:
        assert ledger_v.find_check(session, "meme", VERSION.id).id == first.id
        days = session.execute(sa.select(CheckKeyRow.day).where(CheckKeyRow.external_id == "meme")).scalars().all()
    assert days == [first.created_at.date()]  # no second key on the later day


def _new(external_id: str):
    from worker.ledger.checks import NewCheck

    return NewCheck(external_id, {"url": f"https://x/{external_id}"})


def test_a_check_is_read_from_its_days_partition_only(ledger_v):
    """A UUIDv7 check id names its day: reading (and ending) a check probes one partition, not every day's."""
    with ledger_v.engine.connect() as connection:
        if not partitions.is_partitioned(connection):
            pytest.skip("SQLite keeps plain tables")
    for days_ago in (3, 2, 1):
        _file_on(ledger_v, days_ago, [f"day-{days_ago}"])
    with ledger_v.session() as session:
        [(check, _)] = ledger_v.create_checks(session, VERSION.id, [_new("today")])
    query = sa.select(CheckRow).where(CheckRow.id == check.id, *made_at([check.id]))
    compiled = query.compile(dialect=ledger_v.engine.dialect, compile_kwargs={"render_postcompile": True})
    with ledger_v.engine.connect() as connection:
        plan = connection.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params).scalar_one()
    scanned = set(re.findall(r'"Relation Name": "(checks_[a-z0-9]+)"', json.dumps(plan)))
    assert scanned == {partitions.partition_name("checks", check.created_at.date())}
