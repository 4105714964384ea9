"""A soak: one worker fed half its capacity for a long while, hostile traffic mixed in. Does anything grow?

One `item worker --concurrency 1` (one GPU loop, tiny models, CPU) on Redis and a fresh ledger. First its capacity
is measured (a burst of inline checks, done per second); then two phases of --minutes each, the same seeded
traffic at half that rate: 70 % inline images, 30 % URLs to a local server answering in 0–300 ms.

    calm      nothing else
    hostile   1 URL in 20 misbehaves (in turn: stalls past the fetch timeout, streams a byte a second for ever,
              lies about its length, claims to be 10 GB, answers HTML), and 2 hostile messages a second
              (tests/integration/hostile.py: no envelope, bad bodies, any code point in any field...)

Every 30 s of the hostile phase the worker's process tree is read from /proc: resident memory, threads and open
files, summed over its processes (the Celery worker and its GPU process). Reported: those at the start and the
end of the phase, and for each phase the checks that never misbehave (`normal`): done per second (from the first
send to the last of them finished) and their latency p50/p99 from filing to result, in the first and the last
fifth of the phase. `ratio`: hostile's done per second over calm's (goal ≥ 0.9; p99 of normal checks < 2 s).

    python -m tests.bench.bench_soak --minutes 60 --json      # the hour the issue asks for
    python -m tests.bench.bench_soak --minutes 10              # a shorter look
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import random
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import sqlalchemy as sa

from tests.bench.bench_stack import BenchWorker, machine, rounded
from tests.conftest import encode, noise_image
from tests.integration.conftest import temporary_postgres_database
from tests.integration.hostile import HostileTraffic
from tests.integration.stack import QuietHandler, local_server, make_stack, platform_client, tiny_models

FETCH_TIMEOUT_S = 10.0
INLINE_SHARE, BAD_EVERY, HOSTILE_PER_S = 0.7, 20, 2.0
MISBEHAVIOURS = ("stall", "endless", "short", "huge", "html")
SAMPLE_EVERY_S = 30.0


@contextlib.contextmanager
def url_server(images: list[bytes]) -> Iterator[str]:
    """/img/<i>?ms=n: image i after n ms; /<misbehaviour>/<i>: a server that stalls, never ends, lies."""
    stop = threading.Event()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            kind, _, name = parts.path.strip("/").partition("/")
            body = images[int(name) % len(images)]
            if kind == "img":
                time.sleep(int(parse_qs(parts.query).get("ms", ["0"])[0]) / 1000)
                self.answer(body)
            elif kind == "stall":
                stop.wait(FETCH_TIMEOUT_S + 5)
                self.answer(body)
            elif kind == "endless":  # no length, a byte a second, for ever
                self.answer(b"", length=None)
                with contextlib.suppress(OSError):
                    while not stop.wait(1.0):
                        self.wfile.write(b"\x89")
                        self.wfile.flush()
            elif kind == "short":  # says more than it sends, then hangs up
                self.answer(body[: len(body) // 3], length=len(body))
            elif kind == "huge":
                self.answer(b"", length=10 * 1024**3)
            else:
                self.answer(b"<html>not an image</html>", "text/html")

    with local_server(Handler) as base:
        try:
            yield base
        finally:
            stop.set()


def process_tree(root: int) -> dict:
    """Resident memory (MiB), threads and open files of `root` and every process below it, summed."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo += children.get(pid, [])
    totals = {"processes": 0, "rss_mib": 0.0, "threads": 0, "open_files": 0}
    for pid in pids:
        with contextlib.suppress(OSError):
            status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
            totals["rss_mib"] += int(status["VmRSS"].split()[0]) / 1024
            totals["threads"] += int(status["Threads"])
            totals["open_files"] += len(os.listdir(f"/proc/{pid}/fd"))
            totals["processes"] += 1
    return totals


def capacity(stack, engine, images: list[bytes], n: int = 400) -> float:
    """Checks done per second, from the first sent to the last done, of a burst of `n` inline images."""
    client = platform_client(stack.env["ITEM_BROKER_URL"], stack.prefix)
    started = time.monotonic()
    for i in range(n):
        image = {"b64": base64.b64encode(images[i % len(images)] + i.to_bytes(4, "big")).decode()}
        client.send_task("item.check", kwargs={"external_id": f"capacity-{i}", "image": image}, queue="item.checks")
    while _count(engine, "capacity-%", "status IN ('done', 'rejected', 'failed')") < n:
        time.sleep(0.2)
    return n / (time.monotonic() - started)


def phase(name: str, stack, engine, worker, images, base: str, rate: float, seconds: float, seed: int) -> dict:
    """Feeds the phase's traffic at `rate` for `seconds`, sampling the worker; returns its figures."""
    client = platform_client(stack.env["ITEM_BROKER_URL"], stack.prefix)
    rng, hostile = random.Random(seed), HostileTraffic(seed, redis=True, max_bytes=64 * 1024, tag=f"x{name}")
    samples, started, sent, urls = [], time.monotonic(), 0, 0
    next_sample, next_hostile = started, started
    while (now := time.monotonic()) - started < seconds:
        if now >= next_sample:
            samples.append({"at_s": round(now - started), **process_tree(worker.process.pid)})
            next_sample += SAMPLE_EVERY_S
        if name == "hostile" and now >= next_hostile:
            stack.redis.lpush(f"{stack.prefix}item.checks", hostile.messages(1)[0].redis_bytes())
            next_hostile += 1 / HOSTILE_PER_S
        time.sleep(max(0.0, started + sent / rate - time.monotonic()))
        group, image = "n", {"b64": base64.b64encode(images[sent % len(images)] + sent.to_bytes(4, "big")).decode()}
        if rng.random() >= INLINE_SHARE:
            urls += 1
            image = {"url": f"{base}/img/{sent}?ms={rng.randint(0, 300)}"}
            if name == "hostile" and urls % BAD_EVERY == 0:
                group, image = "b", {"url": f"{base}/{MISBEHAVIOURS[urls // BAD_EVERY % len(MISBEHAVIOURS)]}/{sent}"}
        external_id = f"{name}-{group}-{sent}"
        client.send_task("item.check", kwargs={"external_id": external_id, "image": image}, queue="item.checks")
        sent += 1
    fed_s = time.monotonic() - started
    deadline = time.monotonic() + 120
    while _count(engine, f"{name}-n-%", "status NOT IN ('done', 'rejected', 'failed')") and time.monotonic() < deadline:
        time.sleep(0.5)
    samples.append({"at_s": round(time.monotonic() - started), **process_tree(worker.process.pid)})
    return {"sent": sent, "fed_s": fed_s, **_latencies(engine, name, seconds), "samples": samples}


def _latencies(engine, name: str, seconds: float) -> dict:
    query = sa.text(
        "SELECT status, extract(epoch FROM finished_at - created_at), extract(epoch FROM created_at),"
        " extract(epoch FROM finished_at) FROM checks WHERE external_id LIKE :prefix"
    )
    with engine.connect() as connection:
        rows = connection.execute(query, {"prefix": f"{name}-n-%"}).all()
    done = [(float(latency), float(created), float(finished)) for status, latency, created, finished in rows
            if status == "done"]  # fmt: skip
    first = min((created for _, created, _ in done), default=0.0)
    last = max((finished for _, _, finished in done), default=first)
    early = sorted(lat for lat, created, _ in done if created - first < seconds / 5)
    late = sorted(lat for lat, created, _ in done if created - first >= seconds * 4 / 5)
    every = sorted(lat for lat, _, _ in done)
    return {
        "normal": len(rows), "normal_done": len(done),
        "done_per_s": len(done) / (last - first) if last > first else None,
        "p50_s": _q(every, 0.5), "p99_s": _q(every, 0.99),
        "first_fifth": {"p50_s": _q(early, 0.5), "p99_s": _q(early, 0.99)},
        "last_fifth": {"p50_s": _q(late, 0.5), "p99_s": _q(late, 0.99)},
    }  # fmt: skip


def _q(values: list[float], q: float) -> float | None:
    return values[min(len(values) - 1, int(q * len(values)))] if values else None


def _count(engine, pattern: str, where: str) -> int:
    with engine.connect() as connection:
        query = sa.text(f"SELECT count(*) FROM checks WHERE external_id LIKE :p AND {where}")  # noqa: S608
        return connection.execute(query, {"p": pattern}).scalar_one()


def run(args: argparse.Namespace, scratch: Path) -> dict:
    store = tiny_models(args.model_dir or scratch / "models")
    images = [encode(noise_image(7_000_000 + i, 64 + i % 5 * 8, 72)) for i in range(64)]
    with temporary_postgres_database() as url, url_server(images) as base, contextlib.ExitStack() as exits:
        stack = exits.enter_context(contextlib.contextmanager(make_stack)(
            url, store, scratch, ITEM_BATCH_SIZE="8", ITEM_BATCH_TIME_BUDGET_S="300", ITEM_LEASE_S="15",
            ITEM_RECONCILE_AFTER_S="900", ITEM_RETRY_BACKOFF_S="2", ITEM_MAX_ATTEMPTS="3",
            ITEM_FETCH_TIMEOUT_S=str(FETCH_TIMEOUT_S), ITEM_FETCH_ALLOWED_NETWORKS="127.0.0.1/32",
            ITEM_THUMBNAIL_MAX_SIDE="0",
        ))  # fmt: skip
        engine = sa.create_engine(url)
        exits.callback(engine.dispose)
        worker = BenchWorker(stack, "soak-worker", concurrency=1)
        exits.callback(worker.close)
        measured = capacity(stack, engine, images)
        rate = args.rate or measured / 2
        seconds = args.minutes * 60
        calm = phase("calm", stack, engine, worker, images, base, rate, seconds, args.seed)
        hostile = phase("hostile", stack, engine, worker, images, base, rate, seconds, args.seed)
    first, last = hostile["samples"][0], hostile["samples"][-1]
    return {
        "capacity_per_s": measured, "rate_per_s": rate, "calm": calm, "hostile": hostile,
        "ratio": hostile["done_per_s"] / calm["done_per_s"] if hostile["done_per_s"] and calm["done_per_s"] else None,
        "growth": {key: last[key] - first[key] for key in ("rss_mib", "threads", "open_files")},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=60.0, help="Minutes of each phase (60).")
    parser.add_argument("--rate", type=float, help="Checks per second (default: half the measured capacity).")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model-dir", type=Path, help="Keep generated models here (default: a temporary folder).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": shlex.join(["python", "-m", "tests.bench.bench_soak", *sys.argv[1:]]),
    }
    with tempfile.TemporaryDirectory() as scratch:
        result = rounded({**header, **run(args, Path(scratch))})
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['date']}  {result['machine']['cpus']} CPUs, {result['machine']['processor']}")
    print(f"{result['command']}: capacity {result['capacity_per_s']}/s, fed {result['rate_per_s']}/s")
    for name in ("calm", "hostile"):
        p = result[name]
        print(f"{name:8} done/s {p['done_per_s']}  p50 {p['p50_s']} s  p99 {p['p99_s']} s  "
              f"first fifth {p['first_fifth']}  last fifth {p['last_fifth']}")  # fmt: skip
    print(f"ratio {result['ratio']}  hostile phase start {result['hostile']['samples'][0]}")
    print(f"                 end   {result['hostile']['samples'][-1]}  growth {result['growth']}")


if __name__ == "__main__":
    main()
