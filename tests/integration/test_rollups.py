"""Rollups of ended checks (`worker.ledger.rollups`) on both ledgers: every figure the operator views read from
them equals a count of the raw rows after a mixed workload, the migration backfills them exactly, and on
PostgreSQL the views' queries never read the rows of finished checks, nor the duplicate-bytes lookup more than one
entry per image (assertions on the plans, not on timings).
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from datetime import timedelta

import pytest
import sqlalchemy as sa
from sqlalchemy import event

from pipeline.core.results import PipelineVersion
from tests.integration.conftest import BACKENDS, temporary_database
from worker.ledger import migrate, reviews, rollups, transitions
from worker.ledger.models import CheckKeyRow, CheckRow, new_check_id, utcnow
from worker.ledger.rollups import minute_of
from worker.ledger.states import TERMINAL_STATUSES, CheckStatus, Priority
from worker.ledger.store import Ending, Lease, Ledger, NewCheck

OLD = PipelineVersion(caption="blip:a", ground="gdino:b", embed="clip:c", head="head:d")
NEW = PipelineVersion(caption="blip:a", ground="gdino:b", embed="clip:c", head="head:e")
VERDICTS = ("fake", "real", "uncertain")
MAX_ATTEMPTS = 3
RATIO = 2 ** (1 / 8)  # a percentile's estimate is within this factor of the exact one (see `rollups`)


# ---------------------------------------------------------------------- a mixed workload


def _register(ledger: Ledger) -> None:
    with ledger.session() as session:
        for version in (OLD, NEW):  # NEW, registered last, is the active one
            ledger.ensure_pipeline_version(session, version, "tiny")


def _file(
    ledger: Ledger, version: PipelineVersion, prefix: str, n: int, before: timedelta = timedelta(0)
) -> list[CheckRow]:
    """`n` checks filed under `version`, the i-th one made `before` and i + 0.5 seconds ago (latencies differ)."""
    new = [NewCheck(f"{prefix}-{i:04d}", {"url": f"https://x/{prefix}/{i}"}) for i in range(n)]
    with ledger.session() as session:
        rows = [row for row, _ in ledger.create_checks(session, version.id, new)]
        return _made_earlier(session, rows, before)


def _made_earlier(session, rows: list[CheckRow], before: timedelta) -> list[CheckRow]:
    """The rows made earlier: a new creation time, and the UUIDv7 id of that time (an id names its day's
    partition, so the two move together), its idempotency key following. Only for rows nothing refers to yet."""
    moved = []
    for i, row in enumerate(rows):
        earlier = row.created_at - before - timedelta(seconds=i + 0.5)
        earlier = earlier.replace(microsecond=earlier.microsecond // 1000 * 1000)
        new_id = new_check_id(earlier)
        session.execute(sa.update(CheckKeyRow).where(CheckKeyRow.check_id == row.id).values(check_id=new_id))
        session.execute(sa.update(CheckRow).where(CheckRow.id == row.id).values(id=new_id, created_at=earlier))
        moved.append(session.scalars(sa.select(CheckRow).where(CheckRow.id == new_id)).one())
    return moved


def _work(ledger: Ledger, version: PipelineVersion, limit: int = 8) -> int:
    """Claims a batch of `version` and ends it the way its external ids say: done with each verdict, rejected,
    failed, or (on a first attempt) queued again for a retry. Returns how many it claimed."""
    lease = Lease.new("test:1", 60)
    with ledger.session() as session:
        rows = ledger.claim(
            session, pipeline_version_id=version.id, limit=limit, lease=lease, max_attempts=MAX_ATTEMPTS
        )
        results, endings = {}, {}
        for row in rows:
            kind = int(row.external_id[-4:]) % 6
            if kind == 3:
                endings[row.id] = Ending(CheckStatus.rejected, "image.invalid", "not an image")
            elif kind == 4:
                endings[row.id] = Ending(CheckStatus.failed, "model.error", "retries used up")
            elif kind == 5 and row.attempts == 1:
                endings[row.id] = Ending(CheckStatus.queued, "fetch.timeout", "slow", available_at=utcnow())
            else:
                results[row.id] = _result(VERDICTS[kind % 3])
        ledger.finish_done_many(session, lease.token, results)
        ledger.end_many(session, lease.token, endings)
    return len(rows)


def _result(verdict: str) -> dict:
    p_fake = {"fake": 0.9, "real": 0.1, "uncertain": 0.5}[verdict]
    return {"image_sha256": "a" * 64, "p_fake": p_fake, "verdict": verdict, "threshold": 0.5, "caption": "c",
            "objects": [], "object_count": 0, "timings_ms": None}  # fmt: skip


def _work_from_threads(ledger: Ledger, version: PipelineVersion, threads: int = 4) -> None:
    """Several workers claiming and ending batches at once until nothing is left to claim."""
    failures = []

    def worker() -> None:
        try:
            while _work(ledger, version):
                pass
        except Exception as error:  # reported below: a thread's exception would vanish
            failures.append(error)

    running = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in running:
        thread.start()
    for thread in running:
        thread.join()
    assert failures == []


def _mixed_workload(ledger: Ledger, monkeypatch) -> None:
    """Fresh checks ended now and two hours ago, retries, re-scores, rejections at filing, an abandoned check, and
    checks left queued and running."""
    _register(ledger)
    _file(ledger, OLD, "early", 30, before=timedelta(hours=3))
    with monkeypatch.context() as past:  # these end two hours ago: inside the last day, outside the last hour
        two_hours_ago = utcnow() - timedelta(hours=2)
        past.setattr(transitions, "utcnow", lambda: two_hours_ago)
        while _work(ledger, OLD):
            pass
    _file(ledger, OLD, "now", 150)
    _work_from_threads(ledger, OLD)
    with ledger.session() as session:
        done = list(session.scalars(sa.select(CheckRow).where(CheckRow.status == CheckStatus.done).limit(60)))
        rescores, _ = ledger.create_rescores(session, done, NEW.id)
        _made_earlier(session, list(rescores.values()), timedelta(0))
    _work_from_threads(ledger, NEW)
    for check in _file(ledger, OLD, "refused", 2):  # the intake rejects what it filed
        with ledger.session() as session:
            assert ledger.finish_rejected(session, check.id, "source.invalid", "no image") is not None
    _abandon(ledger, _file(ledger, NEW, "killer", 1)[0])
    _file(ledger, NEW, "waiting", 5)
    with ledger.session() as session:  # 3 of the waiting ones stay running
        lease = Lease.new("test:2", 60)
        ledger.claim(session, pipeline_version_id=NEW.id, limit=3, lease=lease, max_attempts=MAX_ATTEMPTS)


def _abandon(ledger: Ledger, check: CheckRow) -> None:
    """A check whose worker died on every attempt, failed by the reconciler's path."""
    with ledger.session() as session:
        ledger.claim(session, pipeline_version_id=NEW.id, limit=1, lease=Lease.new("test:3", 60), max_attempts=1)
        session.execute(sa.update(CheckRow).where(CheckRow.id == check.id).values(lease_expires_at=utcnow()))
    with ledger.session() as session:
        assert ledger.fail_abandoned(session, check.id, 1, "check.stuck", "died") is not None


# ---------------------------------------------------------------------- the raw counts


def _raw(session, *columns, where=sa.true()) -> Counter:
    query = sa.select(*columns, sa.func.count()).where(where).group_by(*columns)
    return Counter({tuple(_plain(value) for value in key): n for *key, n in session.execute(query)})


def _plain(value):
    return value.value if isinstance(value, CheckStatus) else value


def _ended_since(since) -> sa.ColumnElement[bool]:
    """What the rollups count since `since`: whole minutes."""
    return sa.and_(CheckRow.status.in_(TERMINAL_STATUSES), CheckRow.finished_at >= minute_of(since))


def _exact_percentile(session, since, q: float) -> float:
    """The reader's figure before the rollups: sorted latencies of the done checks, the one at int(q × n)."""
    query = sa.select(CheckRow.created_at, CheckRow.finished_at).where(
        _ended_since(since), CheckRow.status == CheckStatus.done
    )
    seconds = sorted((done - filed).total_seconds() for filed, done in session.execute(query))
    return seconds[min(len(seconds) - 1, int(q * len(seconds)))]


def _assert_figures_match_the_rows(ledger: Ledger) -> None:
    now = utcnow()
    hour, day = now - timedelta(hours=1), now - timedelta(days=1)
    with ledger.session() as session:
        per_status = _raw(session, CheckRow.status)
        assert ledger.count_by_status(session) == {status.value: per_status[(status.value,)] for status in CheckStatus}
        per_version = _raw(session, CheckRow.pipeline_version_id, CheckRow.status)
        expected = {}
        for (version_id, status), n in per_version.items():
            expected.setdefault(version_id, {})[status] = n
        assert ledger.checks_per_version(session) == expected
        for since in (hour, day):
            ended = _raw(session, CheckRow.status, where=_ended_since(since))
            live = {status: per_status[(status,)] for status in ("queued", "running")}
            figures = {status.value: ended[(status.value,)] for status in CheckStatus} | live
            assert reviews.status_counts_since(session, since) == figures
            assert reviews.finished_since(session, since) == sum(ended.values())
            done = _raw(session, CheckRow.pipeline_version_id, CheckRow.verdict,
                        where=sa.and_(_ended_since(since), CheckRow.status == CheckStatus.done))  # fmt: skip
            verdicts = {}
            for (version_id, verdict), n in done.items():
                verdicts.setdefault(version_id, {})[verdict or "none"] = n
            assert reviews.verdicts_per_version(session, since) == verdicts
            for name, estimate in reviews.latency_percentiles(session, since).items():
                exact = _exact_percentile(session, since, int(name[1:]) / 100)
                assert exact / RATIO <= estimate <= exact * RATIO, (name, estimate, exact)
        rescores = sa.and_(CheckRow.pipeline_version_id == NEW.id, CheckRow.priority == Priority.rescore)
        rescored = _raw(session, CheckRow.status, where=rescores)
        assert reviews.rescore_counts(session, NEW.id) == {status: n for (status,), n in rescored.items()}


def test_every_figure_equals_a_count_of_the_rows_after_a_mixed_workload(ledger, monkeypatch):
    _mixed_workload(ledger, monkeypatch)
    with ledger.session() as session:
        statuses = _raw(session, CheckRow.status)
        windows = (reviews.finished_since(session, utcnow() - timedelta(hours=1)),
                   reviews.finished_since(session, utcnow() - timedelta(days=1)))  # fmt: skip
    assert set(statuses) == {(status.value,) for status in CheckStatus}  # the workload reached every status
    assert 0 < windows[0] < windows[1]  # and both windows, apart
    _assert_figures_match_the_rows(ledger)


def test_pruning_drops_old_minutes_and_keeps_the_totals(ledger, monkeypatch):
    _mixed_workload(ledger, monkeypatch)
    day = utcnow() - timedelta(days=1)
    with ledger.session() as session:
        totals, hour_figures = ledger.count_by_status(session), reviews.status_counts_since(session, utcnow())
        assert rollups.prune_rollups(session, timedelta(hours=1)) > 0
    with ledger.session() as session:
        assert ledger.count_by_status(session) == totals
        assert reviews.status_counts_since(session, utcnow()) == hour_figures
        assert reviews.finished_since(session, day) == reviews.finished_since(session, utcnow() - timedelta(hours=1))


def test_a_replaced_check_keeps_its_earlier_ending_counted(ledger):
    """The rollups count endings: a rejected check that a resubmission replaced still counts as one rejection,
    though its row is queued again (and ending it again counts a second ending)."""
    _register(ledger)
    check = _file(ledger, NEW, "resent", 1)[0]
    with ledger.session() as session:
        ledger.finish_rejected(session, check.id, "source.invalid", "no image")
        ledger.replace_check(session, check.id, NewCheck(check.external_id, {"url": "https://x/fixed"}))
    with ledger.session() as session:
        counts = ledger.count_by_status(session)
    assert counts == {"queued": 1, "running": 0, "done": 0, "rejected": 1, "failed": 0}


def test_a_batch_of_endings_costs_one_statement_per_rollup(ledger):
    _register(ledger)
    _file(ledger, NEW, "batch", 24)
    lease = Lease.new("test:1", 60)
    with ledger.session() as session:
        rows = ledger.claim(session, pipeline_version_id=NEW.id, limit=24, lease=lease, max_attempts=MAX_ATTEMPTS)
        with _statements(ledger) as sent:
            ledger.finish_done_many(
                session, lease.token, {row.id: _result(VERDICTS[i % 3]) for i, row in enumerate(rows)}
            )
    rollup_writes = Counter(statement.split()[2] for statement, _ in sent if statement.startswith("INSERT INTO check"))
    assert rollup_writes == {"check_rollups": 1, "check_totals": 1, "check_latency_rollups": 1}


class _statements:
    """The statements (and their parameters) sent through `ledger` meanwhile."""

    def __init__(self, ledger: Ledger):
        self.engine, self.sent = ledger.engine, []

    def _record(self, _connection, _cursor, statement, parameters, *_args) -> None:
        self.sent.append((statement, parameters))

    def __enter__(self) -> list[tuple[str, dict]]:
        event.listen(self.engine, "before_cursor_execute", self._record)
        return self.sent

    def __exit__(self, *_exc) -> None:
        event.remove(self.engine, "before_cursor_execute", self._record)


# ---------------------------------------------------------------------- the migration's backfill


def _legacy_checks(n: int) -> list[dict]:
    """Checks as a ledger at 0007 holds them: every status, two versions, both priorities, verdicts and none,
    ended over the last two days, latencies of 3 to 3 + n/10 seconds (never on a bucket's edge)."""
    now = utcnow()
    rows = []
    for i in range(n):
        status = ("done", "done", "done", "rejected", "failed", "queued", "running")[i % 7]
        finished = now - timedelta(minutes=7 * i) if status in ("done", "rejected", "failed") else None
        created = (finished or now) - timedelta(seconds=3 + i / 10)
        rows.append({
            "id": f"legacy-{i}", "external_id": f"post-{i}", "pipeline_version_id": (OLD.id, NEW.id)[i % 2],
            "source": {}, "status": status, "attempts": 1, "priority": Priority.rescore if i % 3 else Priority.fresh,
            "verdict": VERDICTS[i % 4] if status == "done" and i % 4 < 3 else None,
            "created_at": created, "updated_at": finished or now, "available_at": created, "finished_at": finished,
        })  # fmt: skip
    return rows


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_migration_backfills_the_rollups_from_the_checks_already_ended(backend, tmp_path):
    with temporary_database(backend, tmp_path) as url:
        migrate.upgrade(url, "0007")
        ledger = Ledger(url)
        try:
            with ledger.session() as session:
                _register(ledger)
                legacy = _legacy_checks(700)  # the columns of `checks` at 0007: later ones (tenant_id) not there yet
                columns = [CheckRow.__table__.c[name]._copy() for name in legacy[0]]
                session.execute(sa.insert(sa.Table("checks", sa.MetaData(), *columns)), legacy)
            migrate.upgrade(url, "0008")
            _assert_figures_match_the_rows(ledger)
            with ledger.session() as session:
                histogram = rollups.latency_histogram_since(session, utcnow() - timedelta(days=7))
                query = sa.select(CheckRow.created_at, CheckRow.finished_at).where(CheckRow.status == "done")
                latencies = [(done - filed).total_seconds() for filed, done in session.execute(query)]
            assert histogram == Counter(rollups.latency_bucket(seconds) for seconds in latencies)
        finally:
            ledger.dispose()


# ---------------------------------------------------------------------- plans (PostgreSQL)


@pytest.fixture(scope="module")
def big_postgres(postgres_url) -> Ledger:
    """A PostgreSQL ledger holding 200,000 done checks of one version, 10,000 of them of the same bytes, and a
    backlog of 2,000 queued ones, analysed so the planner knows it."""
    migrate.upgrade(postgres_url)
    ledger = Ledger(postgres_url)
    _register(ledger)
    with ledger.engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO checks (id, external_id, pipeline_version_id, source, image_sha256, status, attempts, "
                "priority, verdict, created_at, updated_at, available_at, finished_at) "
                "SELECT 'big-' || i, 'post-' || i, :version, '{}', "
                "CASE WHEN i <= 10000 THEN repeat('m', 64) ELSE md5(i::text) || md5(i::text) END, "
                "CASE WHEN i <= 200000 THEN 'done' ELSE 'queued' END, 1, 0, 'real', "
                "now() - interval '1 minute' * (i % 1440) - interval '5 seconds', now(), now(), "
                "CASE WHEN i <= 200000 THEN now() - interval '1 minute' * (i % 1440) END "
                "FROM generate_series(1, 202000) AS i"
            ),
            {"version": OLD.id},
        )
        connection.exec_driver_sql("ANALYZE checks")
    yield ledger
    ledger.dispose()


def _plans(ledger: Ledger, sent: list[tuple[str, dict]], *, analyze: bool = False) -> list[dict]:
    options = "ANALYZE, FORMAT JSON" if analyze else "FORMAT JSON"
    with ledger.engine.connect() as connection:
        return [
            connection.exec_driver_sql(f"EXPLAIN ({options}) {statement}", parameters).scalar_one()[0]["Plan"]
            for statement, parameters in sent
            if statement.lstrip().upper().startswith("SELECT")
        ]


def _nodes(plan: dict):
    yield plan
    for child in plan.get("Plans", []):
        yield from _nodes(child)


def test_the_operator_views_read_no_finished_check(big_postgres):
    """Every statement of the operations page, `item status` and `item versions` reads the rollups, and of
    `checks` only queued and running entries (a claim index, or an index range of those statuses): never a scan
    of `checks`, nor an index range holding finished checks."""
    ledger, now = big_postgres, utcnow()
    with ledger.session() as session, _statements(ledger) as sent:
        for since in (now - timedelta(hours=1), now - timedelta(days=1)):
            reviews.status_counts_since(session, since)
            reviews.finished_since(session, since)
            reviews.verdicts_per_version(session, since)
        reviews.latency_percentiles(session, now - timedelta(hours=1))
        reviews.rescore_counts(session, NEW.id)
        ledger.count_by_status(session)
        ledger.checks_per_version(session)
        ledger.count_waiting(session)
    plans = _plans(ledger, sent)
    assert len(plans) >= 12
    for plan in plans:
        on_checks = [node for node in _nodes(plan) if node.get("Index Name", "").startswith(("ix_checks", "pk_checks"))]
        assert all(_unfinished_only(node) for node in on_checks), json.dumps(plan)
        assert all(node["Node Type"] != "Seq Scan" or node["Relation Name"] != "checks" for node in _nodes(plan))


def _unfinished_only(node: dict) -> bool:
    """An index read of queued or running checks only."""
    condition = node.get("Index Cond", "")  # e.g. ((status)::text = 'queued'::text)
    pinned = "status" in condition and any(f"'{status}'" in condition for status in ("queued", "running"))
    return node["Index Name"].startswith("ix_checks_claim_") or pinned


def test_a_duplicate_lookup_reads_one_entry_per_image(big_postgres):
    """10,000 earlier checks of the same bytes: the lookup still reads one index entry for them."""
    ledger = big_postgres
    popular, unseen = "m" * 64, "0" * 64
    with ledger.session() as session:
        found = ledger.done_checks_for_images(session, [popular, unseen], OLD.id)
        first = session.execute(
            sa.select(CheckRow.id).where(CheckRow.image_sha256 == popular)
            .order_by(CheckRow.finished_at, CheckRow.id).limit(1)
        ).scalar_one()  # fmt: skip
    assert list(found) == [popular] and found[popular].id == first
    with ledger.session() as session, _statements(ledger) as sent:
        ledger.done_checks_for_images(session, [popular], OLD.id)
    (plan,) = _plans(ledger, sent, analyze=True)
    # `checks` is partitioned by day: each day's copy of the index is probed once, for at most one entry, and
    # the planner may scan the empty days' partitions instead (nothing to read there)
    lookups = [node for node in _nodes(plan) if "image_sha256" in node.get("Index Name", "")]
    assert lookups and all(node["Actual Rows"] <= 1 and node["Actual Loops"] <= 1 for node in lookups), plan
    scans = [node for node in _nodes(plan) if node["Node Type"] == "Seq Scan"]
    assert all(node["Actual Rows"] == node.get("Rows Removed by Filter", 0) == 0 for node in scans), plan


def test_the_sqlite_lookup_searches_the_index(tmp_path):
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    migrate.upgrade(url)
    ledger = Ledger(url)
    try:
        with ledger.session() as session, _statements(ledger) as sent:
            ledger.done_checks_for_images(session, ["a" * 64], OLD.id)
        with ledger.engine.connect() as connection:
            (statement, parameters), *_ = [(text, values) for text, values in sent if text.startswith("SELECT")]
            plan = " | ".join(
                row[-1] for row in connection.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)
            )
    finally:
        ledger.dispose()
    assert "INDEX ix_checks_done_by_image (image_sha256=? AND pipeline_version_id=?)" in plan, plan
    assert "SCAN checks" not in plan, plan
