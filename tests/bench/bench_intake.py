"""Intake rate: how fast one intake-only worker turns a backlog of `item.check` messages into ledger rows.

    python -m tests.bench.bench_intake [--messages 5000] [--json]

N messages (inline images, as a platform's Celery client sends them) wait in Redis before an intake-only
`item worker --concurrency 0` starts; the rate is the rows filed per second between the first row and the last
(their `created_at` in the ledger, so start-up and polling are not counted). No model runs: this is the speed of
validating, keeping blobs, filing rows and acknowledging. Runs against any version of the worker that has
`tests/integration/stack.py` (the before-and-after figures in the README came from one sitting).
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
import time
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa

from tests.conftest import encode, noise_image
from tests.integration.conftest import temporary_postgres_database
from tests.integration.stack import Worker, make_stack, platform_client, tiny_models
from worker.ledger.models import CheckRow


def measure(stack, messages: int) -> dict:
    image = base64.b64encode(encode(noise_image(1, 64, 64))).decode()
    app = platform_client(stack.env["ITEM_BROKER_URL"], stack.prefix)
    with app.producer_or_acquire() as producer:
        for i in range(messages):
            kwargs = {"external_id": f"intake-{i}", "image": {"b64": image}}
            app.send_task("item.check", kwargs=kwargs, queue="item.checks", producer=producer)
    worker = Worker(stack, "intake", concurrency=0)
    try:
        deadline = time.monotonic() + 600
        while (filed := _count(stack)) < messages:
            if time.monotonic() > deadline:
                raise AssertionError(f"only {filed} of {messages} filed in 600 s")
            time.sleep(0.2)
        with stack.ledger.session() as session:
            first, last = session.execute(
                sa.select(sa.func.min(CheckRow.created_at), sa.func.max(CheckRow.created_at))
            ).one()
    finally:
        worker.stop()
    seconds = (last - first).total_seconds()
    return {"messages": messages, "seconds": round(seconds, 2), "per_s": round((messages - 1) / seconds, 1)}


def _count(stack) -> int:
    with stack.ledger.session() as session:
        return session.scalar(sa.select(sa.func.count()).select_from(CheckRow))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--postgres-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        store = tiny_models(folder / "models")
        with (
            temporary_postgres_database(args.postgres_url) as url,
            contextmanager(make_stack)(url, store, folder) as stack,
        ):
            result = measure(stack, args.messages)
    result = {"date": datetime.now(UTC).isoformat(timespec="seconds"), **result}
    print(json.dumps(result) if args.json else f"{result['messages']} messages filed at {result['per_s']}/s")


if __name__ == "__main__":
    main()
