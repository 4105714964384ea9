"""The hostile intake fuzz at full size: 10,000 seeded hostile messages among good checks, through one real worker.

    python -m tests.bench.bench_hostile [--broker redis|rabbitmq] [--hostile 10000] [--good 200] [--seed 1]

The same traffic and accounting as tests/integration/test_hostile_intake.py (which sends 300): every good check
must end done, every hostile message exactly one check row or one dead letter, nothing left queued or running,
and the worker alive afterwards. Prints one JSON line: the counts, dead letters by code, and the seconds from
the first message sent until everything settled. Exits 1 if any of that does not hold.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import sqlalchemy as sa

from tests.bench.bench_redelivery import _broker_url
from tests.integration.conftest import temporary_postgres_database
from tests.integration.stack import Worker, make_stack, tiny_models
from tests.integration.test_hostile_intake import MAX_B64, send_hostile_traffic, wait_for_every_message
from worker.ledger.models import DeadLetterRow


def run(stack, kind: str, hostile: int, good: int, seed: int) -> dict:
    stack.kind = kind
    with stack.ledger.session() as session:
        session.execute(sa.delete(DeadLetterRow))
    worker = Worker(stack, f"bench-hostile-{kind}")
    try:
        started = time.monotonic()
        good_ids, messages = send_hostile_traffic(stack, seed=seed, hostile=hostile, good=good)
        sent_s = time.monotonic() - started
        outcome = wait_for_every_message(stack, good_ids, messages, timeout_s=1800)
        settled_s = time.monotonic() - started
        alive = worker.process.poll() is None
        died = worker.log.read_text().count("thread item-")
    finally:
        worker.stop()
    ok = (
        outcome["good_done"] == good
        and outcome["rows"] + outcome["dead_letters"] == hostile
        and outcome["unfinished"] == 0
        and alive
        and died == 0
    )
    return {
        "ok": ok, "broker": kind, "hostile": hostile, "good": good, "seed": seed, **outcome,
        "worker_alive": alive, "thread_deaths_logged": died, "sent_s": round(sent_s, 1),
        "settled_s": round(settled_s, 1),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=["redis", "rabbitmq"], default="redis")
    parser.add_argument("--hostile", type=int, default=10_000)
    parser.add_argument("--good", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        store = tiny_models(folder / "models")
        with _broker_url(args.broker, folder) as broker, temporary_postgres_database(args.postgres_url) as url:
            overrides = {"ITEM_MAX_B64_BYTES": str(MAX_B64), "ITEM_FETCH_TIMEOUT_S": "2", "ITEM_MAX_ATTEMPTS": "2"}
            with contextmanager(make_stack)(url, store, folder, **overrides, **broker) as stack:
                result = run(stack, args.broker, args.hostile, args.good, args.seed)
    print(json.dumps(result))
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
