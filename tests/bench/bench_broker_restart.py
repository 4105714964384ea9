"""What a broker restart loses, measured: messages waiting in the broker when it is killed (SIGKILL) and restarted.

    python -m tests.bench.bench_broker_restart [--messages 1000]

For each setting (Redis keeping nothing on disk, Redis with an append-only file synced every second or on every
write, RabbitMQ with a durable queue and persistent messages published with confirms), on a server of its own:
a platform's Celery client sends the messages while no intake runs, so they all wait in the broker; the broker is
killed and started again; the messages still there are counted. With an intake running, a message waits in the
broker only the milliseconds until it is filed (tests/integration/test_worker_intake.py); this measures what a
restart in that window, or while no worker runs, can cost. A killed process is not a lost machine: what the
operating system had not written to disk (Redis' `everysec`: up to a second of writes) is not measured here.
"""

from __future__ import annotations

import argparse
import base64
import json
import tempfile
import time
from pathlib import Path

import redis
from kombu import Connection

from tests.conftest import encode, noise_image
from tests.integration.brokers import RabbitServer, RedisServer
from tests.integration.stack import platform_client
from worker.intake.broker import check_queue

SETTINGS = {
    "redis (no persistence)": lambda folder: RedisServer(folder),
    "redis (appendfsync everysec)": lambda folder: RedisServer(folder, appendfsync="everysec"),
    "redis (appendfsync always)": lambda folder: RedisServer(folder, appendfsync="always"),
    "rabbitmq (durable, persistent, confirms)": lambda folder: RabbitServer(folder),
}


def measure(name: str, server, messages: int) -> dict:
    server.start()
    try:
        if isinstance(server, RabbitServer):
            with Connection(
                server.url
            ) as connection:  # the queue exists before the first message, as a worker makes it
                check_queue()(connection.default_channel).declare()
        app = platform_client(server.url)
        image = base64.b64encode(encode(noise_image(1, 32, 32))).decode()
        started = time.monotonic()
        with app.producer_or_acquire() as producer:
            for index in range(messages):
                kwargs = {"external_id": f"restart-{index}", "image": {"b64": image}}
                app.send_task("item.check", kwargs=kwargs, queue="item.checks", producer=producer)
        sent_s = time.monotonic() - started
        server.kill()
        server.start()
        kept = _waiting(server)
    finally:
        server.kill()
    return {"broker": name, "sent": messages, "kept": kept, "lost": messages - kept, "send_seconds": round(sent_s, 2)}


def _waiting(server) -> int:
    if isinstance(server, RedisServer):
        return int(redis.Redis.from_url(server.url).llen("item.checks"))
    with Connection(server.url) as connection:
        _, count, _ = connection.default_channel.queue_declare("item.checks", passive=True)
        return int(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="item-broker-") as folder:
        for index, (name, make) in enumerate(SETTINGS.items()):
            rows.append(measure(name, make(Path(folder) / str(index)), args.messages))
            line = json.dumps(rows[-1]) if args.json else (
                f"{name:42s} sent {rows[-1]['sent']:6d}  kept {rows[-1]['kept']:6d}  lost {rows[-1]['lost']:6d}"
            )  # fmt: skip
            print(line, flush=True)


if __name__ == "__main__":
    main()
