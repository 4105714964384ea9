"""The ledger behind a real PgBouncer in transaction mode (Debian's `pgbouncer`, started here on a free port).

Everything goes through the pooler except what needs one server session for long: the LISTEN wake-ups and the
reconciler's advisory lock, which take ITEM_DATABASE_SESSION_URL (here: the database directly). The tests also
show why: through the pooler a LISTEN hears nothing, and two electors both "hold" the lock.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from pipeline.core.results import PipelineVersion
from tests.integration.brokers import free_port
from tests.integration.conftest import temporary_postgres_database
from worker.ledger import migrate
from worker.ledger.engine import libpq_dsn
from worker.ledger.leadership import AdvisoryLock
from worker.ledger.models import CheckRow
from worker.ledger.store import Lease, Ledger, NewCheck
from worker.ledger.wakeups import Listener, notify_new_checks
from worker.ops.reconciler import ADVISORY_LOCK

PGBOUNCER = shutil.which("pgbouncer") or ("/usr/sbin/pgbouncer" if os.path.exists("/usr/sbin/pgbouncer") else None)
pytestmark = pytest.mark.skipif(PGBOUNCER is None, reason="no pgbouncer binary (apt-get install pgbouncer)")

VERSION = PipelineVersion(caption="blip:a", ground="gdino:b", embed="clip:c", head="head:pgbouncer")


class Bouncer:
    """URLs of one database: `pooled` (PgBouncer, transaction mode, 2 server connections), `solo` (the same
    through a pool of one server connection) and `direct` (PostgreSQL itself)."""

    def __init__(self, direct: str, port: int):
        self.direct = direct
        url = sa.make_url(direct)
        self.pooled = url.set(port=port).render_as_string(hide_password=False)
        self.solo = url.set(port=port, database="solo").render_as_string(hide_password=False)


@pytest.fixture(scope="module")
def bouncer() -> Iterator[Bouncer]:
    with temporary_postgres_database() as direct, _pgbouncer(sa.make_url(direct)) as port:
        migrate.upgrade(sa.make_url(direct).set(port=port).render_as_string(hide_password=False))
        yield Bouncer(direct, port)


@pytest.fixture
def ledger(bouncer) -> Iterator[Ledger]:
    ledger = Ledger(bouncer.pooled)
    with ledger.session() as session:
        session.execute(sa.delete(CheckRow))
        ledger.ensure_pipeline_version(session, VERSION, "tiny")
    yield ledger
    ledger.dispose()


def _pgbouncer(database: sa.URL):
    """Runs pgbouncer with its own config in a folder of its own; yields its port."""
    from contextlib import contextmanager

    @contextmanager
    def running() -> Iterator[int]:
        folder = Path(tempfile.mkdtemp(prefix="item-pgbouncer-"))
        folder.chmod(0o755)  # readable by `nobody`, whom pgbouncer becomes when started as root
        port = free_port()
        (folder / "users.txt").write_text(f'"{database.username}" ""\n')
        (folder / "pgbouncer.ini").write_text(_config(database, port, folder))
        for path in folder.iterdir():
            path.chmod(0o644)
        as_nobody = ["-u", "nobody"] if os.geteuid() == 0 else []  # it refuses to run as root
        log = (folder / "log.txt").open("wb")
        process = subprocess.Popen([PGBOUNCER, *as_nobody, str(folder / "pgbouncer.ini")], stdout=log, stderr=log)
        try:
            _wait_until_it_answers(database.set(port=port), process, folder / "log.txt")
            yield port
        finally:
            process.terminate()
            process.wait(10)
            log.close()
            shutil.rmtree(folder, ignore_errors=True)

    return running()


def _config(database: sa.URL, port: int, folder: Path) -> str:
    host, server_port = database.host or "127.0.0.1", database.port or 5432
    return textwrap.dedent(f"""\
        [databases]
        {database.database} = host={host} port={server_port}
        solo = host={host} port={server_port} dbname={database.database} pool_size=1
        [pgbouncer]
        listen_addr = 127.0.0.1
        listen_port = {port}
        unix_socket_dir =
        auth_type = trust
        auth_file = {folder / "users.txt"}
        pool_mode = transaction
        default_pool_size = 2
        max_client_conn = 200
        ignore_startup_parameters = extra_float_digits,options
        """)


def _wait_until_it_answers(pooled: sa.URL, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"pgbouncer exited: {log.read_text()[-2000:]}")
        try:
            psycopg.connect(libpq_dsn(pooled), autocommit=True, connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            time.sleep(0.1)
    pytest.fail(f"pgbouncer did not answer on port {pooled.port}: {log.read_text()[-2000:]}")


# ---------------------------------------------------------------------------------------------- the ledger


def test_checks_are_filed_claimed_and_finished_through_the_pooler(ledger):
    with ledger.session() as session:
        filed = ledger.create_checks(session, VERSION.id, [NewCheck(f"e{i}", {"url": "http://x/"}) for i in range(40)])
    assert all(created for _, created in filed)

    def claim_and_finish(worker: int, finished: list[str]) -> None:
        lease = Lease.new(f"worker:{worker}", 30)
        while True:  # the same statements, many times over, on server sessions that change under them
            with ledger.session() as session:
                batch = ledger.claim(session, pipeline_version_id=VERSION.id, limit=2, lease=lease, max_attempts=5)
            if not batch:
                return
            with ledger.session() as session:
                for check in batch:
                    if ledger.finish_failed(session, check.id, "test.done", "finished", lease.token) is not None:
                        finished.append(check.id)

    finished: list[str] = []
    workers = [threading.Thread(target=claim_and_finish, args=(n, finished)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert sorted(finished) == sorted(check.id for check, _ in filed)  # each once, none twice
    with ledger.session() as session:
        assert ledger.count_by_status(session).get("failed") == 40


def test_prepared_statements_would_break_behind_the_pooler(bouncer):
    """Why the ledger's engine never prepares: two clients of one server session name their statements alike."""
    first, second = (psycopg.connect(libpq_dsn(bouncer.solo), autocommit=True, prepare_threshold=0) for _ in range(2))
    try:
        first.execute("SELECT 1")
        with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
            second.execute("SELECT 1")
    finally:
        first.close()
        second.close()


# ---------------------------------------------------------------------------------------------- wake-ups


def test_a_wake_up_reaches_a_listener_on_the_session_url(bouncer, ledger):
    listener = Listener(bouncer.direct, VERSION.id)
    try:
        assert listener.wait(0.01) is False  # connected and listening
        with ledger.session() as session:  # filed through the pooler: NOTIFY travels with the commit
            notify_new_checks(session, VERSION.id)
        assert listener.wait(5) is True
    finally:
        listener.close()


def test_a_listener_through_the_pooler_hears_nothing(bouncer, ledger):
    listener = Listener(bouncer.pooled, VERSION.id)
    try:
        listener.wait(0.01)
        with ledger.session() as session:
            notify_new_checks(session, VERSION.id)
        assert listener.wait(1.5) is False  # its LISTEN went with a server session it no longer holds
    finally:
        listener.close()


# ---------------------------------------------------------------------------------------------- the reconciler's lock


def test_one_elector_wins_and_its_death_frees_the_lock(bouncer):
    winner = _elector_process(bouncer.direct)
    other = AdvisoryLock(bouncer.direct, ADVISORY_LOCK)
    try:
        assert winner.stdout.readline().strip() == "True"
        assert other.held() is False
        winner.kill()  # a worker killed outright: PostgreSQL ends its session, and the lock with it
        winner.wait(10)
        assert _eventually(other.held)
        assert AdvisoryLock(bouncer.direct, ADVISORY_LOCK).held() is False  # and now it is the one holding it
    finally:
        winner.kill()
        other.release()


def test_a_lock_through_the_pooler_is_held_by_everyone(bouncer):
    """What ITEM_DATABASE_SESSION_URL prevents: through transaction pooling the lock stays with a server
    session, and whoever runs on that session next holds it too."""
    first, second = AdvisoryLock(bouncer.solo, ADVISORY_LOCK + 1), AdvisoryLock(bouncer.solo, ADVISORY_LOCK + 1)
    try:
        assert first.held() and second.held()  # two leaders
    finally:
        first.release()
        second.release()


def _elector_process(url: str) -> subprocess.Popen:
    code = (
        "import sys, time\n"
        "from worker.ledger.leadership import AdvisoryLock\n"
        f"lock = AdvisoryLock({url!r}, {ADVISORY_LOCK})\n"
        "print(lock.held(), flush=True)\n"
        "time.sleep(120)\n"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)


def _eventually(condition, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False
