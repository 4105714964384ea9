"""Chaos: N checks from a platform's plain Celery client, M workers, and faults while uploads flow.

    python -m tests.bench.bench_chaos --checks 10000 --workers 3 --kills 5 [--broker redis|redis-aof|rabbitmq]

What it does, on a Postgres database and a broker server of its own (the machine's servers are never touched):
the checks' messages are sent at a steady pace, each with an image of its own (so no two share an answer); while
they flow, K workers are SIGKILLed one at a time (and replaced), the broker is killed and restarted once,
Postgres is cut off once (every connection to the database terminated, over and over, for a few seconds; the
server itself keeps running), and the fleet is upgraded to a new head one worker at a time (the new version
activated once its first worker is ready, the old workers stopped once their version has nothing left). Then it
waits for every check to end and prints what became of them:

    done / rejected / failed   the checks' outcomes
    lost                       messages sent (the broker confirmed them) with no check in the ledger
    duplicated                 an upload with two checks under one version (the schema forbids it)
    refiled                    an upload filed under both versions (a message delivered again after the switch)
    stuck                      checks still unfinished at the end

It exits non-zero on any loss, duplicate or stuck check. `tests/integration/test_chaos.py` runs a small one.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import redis
import sqlalchemy as sa

from pipeline.core.head import Head
from pipeline.core.model_store import ModelStore
from tests.conftest import encode, noise_image
from tests.integration.brokers import RabbitServer, RedisServer
from tests.integration.conftest import temporary_postgres_database
from tests.integration.stack import Worker, make_stack, platform_client, run_item, tiny_models
from worker.ledger.models import CheckRow

TERMINAL = {"done", "rejected", "failed"}


@dataclass
class Chaos:
    checks: int = 200
    workers: int = 2
    kills: int = 1
    broker: str = "redis"  # redis (nothing on disk), redis-aof (appendfsync everysec) or rabbitmq
    broker_restart: bool = True
    postgres_outage: bool = True
    rolling_upgrade: bool = True
    send_seconds: float = 30.0  # the messages are spread over this long, so the faults meet a flow
    timeout_s: float = 600.0


@dataclass
class Report:
    sent: int = 0
    done: int = 0
    rejected: int = 0
    failed: int = 0
    lost: int = 0
    duplicated: int = 0
    refiled: int = 0
    stuck: int = 0
    seconds: float = 0.0
    started: float = field(default_factory=time.monotonic, repr=False)
    events: list[str] = field(default_factory=list)
    lost_ids: list[str] = field(default_factory=list)  # the first few, with when they were sent (s into the run)
    sent_at: dict[str, float] = field(default_factory=dict, repr=False)
    left_in_broker: dict = field(default_factory=dict)  # what the broker still holds at the end

    def note(self, event: str) -> None:
        self.events.append(f"{time.monotonic() - self.started:6.1f}s {event}")

    @property
    def ok(self) -> bool:
        return self.lost == self.duplicated == self.stuck == 0 and self.sent == self.done + self.rejected + self.failed


def run(chaos: Chaos, folder: Path, postgres_url: str, store: ModelStore) -> Report:
    broker = _broker(chaos.broker, folder / "broker")
    broker.start()
    try:
        with (
            temporary_postgres_database(postgres_url) as database_url,
            contextmanager(make_stack)(database_url, store, folder, **_settings(broker)) as stack,
        ):
            return _run(chaos, stack, broker)
    finally:
        broker.kill()


def _broker(kind: str, folder: Path):
    if kind == "rabbitmq":
        return RabbitServer(folder)
    return RedisServer(folder, appendfsync="everysec" if kind == "redis-aof" else None)


def _settings(broker) -> dict[str, str]:
    return {
        "ITEM_BROKER_URL": broker.url,
        "ITEM_BATCH_SIZE": "8",
        "ITEM_BATCH_MAX_WAIT_S": "0.05",
        "ITEM_LEASE_S": "5",
        "ITEM_IDLE_POLL_S": "1",
        "ITEM_BATCH_TIME_BUDGET_S": "60",
        "ITEM_RECONCILE_AFTER_S": "120",
        "ITEM_RECONCILE_INTERVAL_S": "5",
        "ITEM_LOG_FORMAT": "text",
    }


def _run(chaos: Chaos, stack, broker) -> Report:
    report = Report()
    started = report.started
    ids = [f"chaos-{i}" for i in range(chaos.checks)]
    fleet = [Worker(stack, f"v1-{i}") for i in range(chaos.workers)]
    sender = threading.Thread(target=_send_all, args=(stack, broker, ids, chaos.send_seconds, report), daemon=True)
    sender.start()
    faults = _faults(chaos)
    try:
        while faults:
            at, fault = faults[0]
            if _progress(stack, ids) >= at:
                faults.pop(0)
                fleet = fault(stack, broker, fleet, report) or fleet
            time.sleep(0.2)
        sender.join()
        _wait_all(stack, ids, started + chaos.timeout_s)
    finally:
        for worker in fleet:
            worker.stop()
    _count(stack, ids, report)
    report.left_in_broker = _left_in(broker, stack.prefix)
    report.seconds = round(time.monotonic() - started, 1)
    return report


def _left_in(broker, prefix: str) -> dict:
    """Messages still in the broker: queued, or taken by an intake and never acknowledged (Redis keeps those)."""
    try:
        if isinstance(broker, RedisServer):
            client = redis.Redis.from_url(broker.url)
            return {"queued": client.llen(f"{prefix}item.checks"), "unacked": client.hlen(f"{prefix}unacked")}
        from kombu import Connection

        with Connection(broker.url) as connection:
            _, count, _ = connection.default_channel.queue_declare("item.checks", passive=True)
        return {"queued": count}
    except Exception as error:
        return {"error": str(error)}


def _faults(chaos: Chaos) -> list:
    """(share of checks finished, fault) in the order they happen."""
    faults = [(0.1 + 0.7 * (k + 1) / (chaos.kills + 1), _kill_one) for k in range(chaos.kills)]
    if chaos.broker_restart:
        faults.append((0.35, _restart_broker))
    if chaos.postgres_outage:
        faults.append((0.55, _cut_postgres))
    if chaos.rolling_upgrade:
        faults.append((0.7, _roll_upgrade))
    return sorted(faults, key=lambda item: item[0])


# ---------------------------------------------------------------------- the platform


def _send_all(stack, broker, ids: list[str], seconds: float, report: Report) -> None:
    """Sends one message per id, spread over `seconds`; a send the broker refused is sent again (a platform's
    client retries too), and counted once the broker took it."""
    pace = seconds / max(1, len(ids))
    app = platform_client(broker.url, stack.prefix)
    for index, external_id in enumerate(ids):
        image = base64.b64encode(encode(noise_image(10_000 + index, 32, 32))).decode()
        while True:
            try:
                app.send_task("item.check", kwargs={"external_id": external_id, "image": {"b64": image}},
                              queue="item.checks", retry=False)  # fmt: skip
                report.sent += 1
                report.sent_at[external_id] = time.monotonic() - report.started
                break
            except Exception:  # the broker is down: wait, then send again
                time.sleep(0.5)
                app = platform_client(broker.url, stack.prefix)
        time.sleep(pace)


# ---------------------------------------------------------------------- faults


def _kill_one(stack, broker, fleet: list, report: Report) -> list:
    victim = random.Random(len(report.events)).choice(fleet)
    victim.kill()
    report.note(f"SIGKILL {victim.name}")
    replacement = Worker(stack, f"{victim.name}-again-{len(report.events)}", env=victim.env)
    report.note(f"{replacement.name} ready in its place")
    return [replacement if worker is victim else worker for worker in fleet]


def _restart_broker(stack, broker, fleet: list, report: Report) -> None:
    broker.kill()
    report.note(f"broker killed ({type(broker).__name__})")
    broker.start()
    report.note("broker restarted")


def _cut_postgres(stack, broker, fleet: list, report: Report, seconds: float = 5.0) -> None:
    database = stack.ledger.engine.url.database
    admin = sa.create_engine(stack.ledger.engine.url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    terminated = 0
    try:
        with admin.connect() as connection:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                terminated += connection.execute(
                    sa.text(
                        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                        "WHERE datname = :db AND pid <> pg_backend_pid()"
                    ),
                    {"db": database},
                ).scalar()
                time.sleep(0.2)
    finally:
        admin.dispose()
    stack.ledger.engine.dispose()
    report.note(f"Postgres cut off for {seconds:.0f}s ({terminated} connections terminated)")


def _roll_upgrade(stack, broker, fleet: list, report: Report) -> list:
    """Replaces the fleet with workers of a new head, one at a time, as an operator would."""
    head = Head.load(stack.settings.head)
    path = Head(head.module, replace(head.metadata, threshold=0.4242)).save(stack.folder / "head-v2.safetensors")
    env = {**stack.env, "ITEM_HEAD": str(path)}
    first = Worker(stack, "v2-0", env=env)
    new_version = first.version_id()
    old_version = fleet[0].version_id()
    run_item(stack.env, "versions", "activate", new_version)
    report.note(f"rolling upgrade: {new_version} active")
    upgraded = [first]
    for index, old in enumerate(fleet):
        if index:
            upgraded.append(Worker(stack, f"v2-{index}", env=env))
        if index == len(fleet) - 1:
            _drain(stack, old_version)  # the last worker of the old version stops once its version is done
        old.stop()
    report.note(f"rolling upgrade: {len(fleet)} workers replaced")
    return upgraded


def _drain(stack, version_id: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with _ledger_retrying(stack) as session:
            left = session.scalar(
                sa.select(sa.func.count()).where(
                    CheckRow.pipeline_version_id == version_id, CheckRow.status.in_(["queued", "running"])
                )
            )
        if left == 0:
            return
        time.sleep(0.5)


# ---------------------------------------------------------------------- watching and counting


@contextmanager
def _ledger_retrying(stack):
    """A session that survives the bench's own Postgres cut: try again until the database answers."""
    for _ in range(100):
        try:
            with stack.ledger.session() as session:
                yield session
            return
        except sa.exc.OperationalError:
            time.sleep(0.3)
    raise RuntimeError("the ledger did not answer")


def _progress(stack, ids: list[str]) -> float:
    with _ledger_retrying(stack) as session:
        finished = session.scalar(
            sa.select(sa.func.count()).where(CheckRow.external_id.in_(ids), CheckRow.status.in_(TERMINAL))
        )
    return finished / max(1, len(ids))


def _wait_all(stack, ids: list[str], deadline: float) -> None:
    while time.monotonic() < deadline:
        with _ledger_retrying(stack) as session:
            finished = session.scalar(
                sa.select(sa.func.count(sa.distinct(CheckRow.external_id))).where(
                    CheckRow.external_id.in_(ids), CheckRow.status.in_(TERMINAL)
                )
            )
        if finished == len(ids):
            return
        time.sleep(1)


def _count(stack, ids: list[str], report: Report) -> None:
    with _ledger_retrying(stack) as session:
        rows = session.execute(
            sa.select(CheckRow.external_id, CheckRow.pipeline_version_id, CheckRow.status).where(
                CheckRow.external_id.in_(ids)
            )
        ).all()
    by_id: dict[str, list] = {}
    for row in rows:
        by_id.setdefault(row.external_id, []).append(row)
    outcomes = Counter()
    for external_id in ids:
        found = by_id.get(external_id, [])
        if not found:
            report.lost += 1
            if len(report.lost_ids) < 10:
                report.lost_ids.append(f"{external_id} (sent at {report.sent_at.get(external_id, -1):.2f}s)")
            continue
        versions = Counter(row.pipeline_version_id for row in found)
        report.duplicated += any(n > 1 for n in versions.values())
        report.refiled += len(versions) > 1
        statuses = {row.status for row in found}
        if not statuses & TERMINAL:
            report.stuck += 1
            continue
        outcomes[min(statuses & TERMINAL)] += 1  # "done" sorts first: an upload answered once is done
    report.done, report.rejected, report.failed = outcomes["done"], outcomes["rejected"], outcomes["failed"]


# ---------------------------------------------------------------------- command line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = Chaos()
    parser.add_argument("--checks", type=int, default=defaults.checks)
    parser.add_argument("--workers", type=int, default=defaults.workers)
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--broker", choices=["redis", "redis-aof", "rabbitmq"], default=defaults.broker)
    parser.add_argument("--send-seconds", type=float, default=None, help="default: 0.02 s per check")
    parser.add_argument("--no-broker-restart", action="store_true")
    parser.add_argument("--no-postgres-outage", action="store_true")
    parser.add_argument("--no-rolling-upgrade", action="store_true")
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    chaos = Chaos(
        checks=args.checks,
        workers=args.workers,
        kills=args.kills,
        broker=args.broker,
        broker_restart=not args.no_broker_restart,
        postgres_outage=not args.no_postgres_outage,
        rolling_upgrade=not args.no_rolling_upgrade,
        send_seconds=args.send_seconds if args.send_seconds is not None else 0.02 * args.checks,
        timeout_s=args.timeout,
    )
    with tempfile.TemporaryDirectory(prefix="item-chaos-") as folder:
        store = tiny_models(Path(folder) / "models")
        report = run(chaos, Path(folder), args.postgres_url, store)
    internal = ("started", "sent_at")  # clocks of this process, and one entry per message
    summary = {**asdict(chaos), **{k: v for k, v in asdict(report).items() if k not in internal}, "ok": report.ok}
    if args.json:
        print(json.dumps(summary))
    else:
        for event in report.events:
            print(f"  {event}")
        print(
            f"sent {report.sent}: done {report.done}, rejected {report.rejected}, failed {report.failed}; "
            f"lost {report.lost}, duplicated {report.duplicated}, refiled {report.refiled}, stuck {report.stuck}; "
            f"{report.seconds:.0f}s"
        )
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main()
