"""What an idle worker costs: CPU seconds and ledger transactions per minute, with nothing to do.

    python -m tests.bench.bench_idle [--seconds 60] [--broker redis|rabbitmq]

One `item worker` (one GPU loop, the intake, the deliverer, the reconciler) on a Postgres database of its own and
the machine's Redis (or a RabbitMQ node of its own), left idle once ready: the CPU time of its processes (from
/proc) and the transactions Postgres committed for its database, over `--seconds`. Then one check is filed, to
show how soon an idle loop takes it (the wake-up).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import tempfile
import time
from pathlib import Path

import sqlalchemy as sa

from tests.integration.brokers import RabbitServer
from tests.integration.conftest import temporary_postgres_database
from tests.integration.stack import Worker, make_stack, tiny_models

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(root: int) -> float:
    """User + system CPU time of `root` and every process below it."""
    total = 0.0
    for pid in [root, *_descendants(root)]:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
    return total


def _descendants(root: int) -> list[int]:
    children = []
    for task in Path(f"/proc/{root}/task").iterdir():
        with contextlib.suppress(OSError):
            children += [int(pid) for pid in (task / "children").read_text().split()]
    return children + [grandchild for child in children for grandchild in _descendants(child)]


def transactions(engine: sa.Engine, database: str) -> int:
    with engine.connect() as connection:
        return connection.execute(
            sa.text("SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = :db"), {"db": database}
        ).scalar()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, temporary_postgres_database() as url:
        folder = Path(scratch)
        store = tiny_models(folder / "models")
        rabbit = RabbitServer(folder / "rabbit") if args.broker == "rabbitmq" else None
        overrides = {}
        if rabbit:
            rabbit.start()
            overrides["ITEM_BROKER_URL"] = rabbit.url
        try:
            with contextlib.contextmanager(make_stack)(url, store, folder, ITEM_IDLE_POLL_S="2", **overrides) as stack:
                result = _measure(stack, args.seconds)
        finally:
            if rabbit:
                rabbit.kill()
    print(json.dumps({"broker": args.broker, **result}))


def _measure(stack, seconds: float) -> dict:
    admin = sa.create_engine(stack.ledger.engine.url.set(database="postgres"))
    database = stack.ledger.engine.url.database
    worker = Worker(stack, "idle")
    try:
        time.sleep(5)  # past start-up
        cpu, xacts, started = cpu_seconds(worker.process.pid), transactions(admin, database), time.monotonic()
        time.sleep(seconds)
        elapsed = time.monotonic() - started
        cpu_used = cpu_seconds(worker.process.pid) - cpu
        xacts_done = transactions(admin, database) - xacts
        submitted = time.monotonic()
        check = stack.submit(str(stack.image(1)))[0]["check_id"]
        stack.wait_terminal([check], timeout=60)
        with stack.ledger.session() as session:
            row = stack.ledger.get_check(session, check)
        claimed_after = (row.started_at - row.created_at).total_seconds()
        return {
            "seconds": round(elapsed, 1),
            "cpu_percent": round(100 * cpu_used / elapsed, 2),
            "ledger_transactions_per_s": round(xacts_done / elapsed, 2),
            "filed_to_claimed_s": round(claimed_after, 3),
            "submit_to_done_s": round(time.monotonic() - submitted, 2),
        }
    finally:
        worker.stop()
        admin.dispose()


if __name__ == "__main__":
    main()
