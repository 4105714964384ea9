"""Slow sources against one worker: does a stalling image host cost its own checks only?

One `item worker --concurrency 1` (one GPU loop, tiny models, CPU) is fed a steady rate of checks by a platform's
Celery client: 70 % inline images, 30 % URLs to a local server answering after 0–300 ms; in the `stalls` mode one
URL in 20 stalls past the fetch timeout (its server answers only ITEM_FETCH_TIMEOUT_S + 5 s later), in `no_stalls`
those same checks are ordinary URLs. The same traffic (one seed) in each mode, each mode on its own fresh ledger
and worker. Optional mode `stalls_wait_all`: the stalls with ITEM_BATCH_READ_WAIT_S = ITEM_FETCH_TIMEOUT_S, so
every batch waits for its downloads (the behaviour before checks could leave a batch).

Needs the test services (Redis and PostgreSQL; see README, Tests). Run on demand, on an otherwise idle machine:
    python -m tests.bench.bench_slow_sources --json                  # 120 s each way at 15 checks/s
    python -m tests.bench.bench_slow_sources --duration 30 --modes stalls,no_stalls,stalls_wait_all

Figures per mode, over the checks that never stall (`normal`): `done_per_s`, those done over the time from the
first send to the last of them finished (feeding stops after --duration; the worker then gets at most --drain-s
to finish them; `unfinished` counts those it did not); `p50_s` / `p99_s`, their latency from filing to result;
and for the stalling checks, how they ended by then (`stalled`). `deferred`: the worker's "check deferred" log
lines. `ratio`: stalls' done_per_s over no_stalls'; `p50_ratio` / `p99_ratio` the same of the latencies.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import random
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import sqlalchemy as sa

from tests.bench.bench_stack import BenchWorker, machine, rounded
from tests.conftest import encode, noise_image
from tests.integration.conftest import temporary_postgres_database
from tests.integration.stack import QuietHandler, local_server, make_stack, platform_client, tiny_models

MODES = ("stalls", "no_stalls", "stalls_wait_all")
INLINE_SHARE, STALL_EVERY, URL_DELAY_MS = 0.7, 20, (0, 300)
FETCH_TIMEOUT_S = 10.0


@contextlib.contextmanager
def image_server(images: list[bytes], stall_s: float) -> Iterator[str]:
    """/img/<i>.png?ms=<n> answers image i after n ms; /stall/<i>.png answers it only after `stall_s`."""
    stop = threading.Event()

    class Handler(QuietHandler):
        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            kind, _, name = parts.path.strip("/").partition("/")
            if kind == "stall":
                stop.wait(stall_s)
            else:
                time.sleep(int(parse_qs(parts.query).get("ms", ["0"])[0]) / 1000)
            self.answer(images[int(name.split(".")[0])])

    with local_server(Handler) as base:
        try:
            yield base
        finally:
            stop.set()


def traffic(n: int, seed: int) -> list[tuple[str, float]]:
    """Each check's kind (inline, url, stall) and its URL's delay in ms; the same for a seed in every mode."""
    rng, urls, plan = random.Random(seed), 0, []
    for _ in range(n):
        if rng.random() < INLINE_SHARE:
            plan.append(("inline", 0.0))
            continue
        urls += 1
        plan.append(("stall" if urls % STALL_EVERY == 0 else "url", rng.uniform(*URL_DELAY_MS)))
    return plan


def feed(client, prefix: str, plan, images: list[bytes], base: str, rate: float, stalls: bool) -> float:
    """Sends the checks at `rate` per second; returns when it started (time.monotonic())."""
    started = time.monotonic()
    for i, (kind, delay_ms) in enumerate(plan):
        time.sleep(max(0.0, started + i / rate - time.monotonic()))
        if kind == "inline":
            image = {"b64": base64.b64encode(images[i]).decode()}
        elif kind == "stall" and stalls:
            image = {"url": f"{base}/stall/{i}.png"}
        else:
            image = {"url": f"{base}/img/{i}.png?ms={delay_ms:.0f}"}
        group = "s" if kind == "stall" else "n"
        client.send_task(
            "item.check", kwargs={"external_id": f"{prefix}{group}-{i}", "image": image}, queue="item.checks"
        )
    return started


ROWS_SQL = sa.text(
    "SELECT external_id, status, error_code, extract(epoch FROM finished_at - created_at) AS latency_s,"
    " extract(epoch FROM finished_at) AS finished_s FROM checks WHERE external_id LIKE :prefix"
)
NORMAL_LEFT_SQL = sa.text(
    "SELECT count(*) FILTER (WHERE status NOT IN ('done', 'rejected', 'failed')) FROM checks"
    " WHERE external_id LIKE :prefix"
)


def run_mode(mode: str, args: argparse.Namespace, store, scratch: Path, images: list[bytes], plan) -> dict:
    folder = scratch / mode
    folder.mkdir()
    wait_all = mode == "stalls_wait_all"
    with (
        temporary_postgres_database() as url,
        image_server(images, FETCH_TIMEOUT_S + 5) as base,
        contextlib.ExitStack() as exits,
    ):
        stack = exits.enter_context(
            contextlib.contextmanager(make_stack)(
                url,
                store,
                folder,
                ITEM_BATCH_SIZE=str(args.batch_size),
                ITEM_BATCH_TIME_BUDGET_S="300",
                ITEM_LEASE_S="15",
                ITEM_RECONCILE_AFTER_S="900",
                ITEM_RETRY_BACKOFF_S="2",
                ITEM_BATCH_MAX_WAIT_S="0.2",
                ITEM_FETCH_TIMEOUT_S=str(FETCH_TIMEOUT_S),
                ITEM_BATCH_READ_WAIT_S=str(FETCH_TIMEOUT_S if wait_all else args.read_wait),
                ITEM_FETCH_ALLOWED_NETWORKS=json.dumps(["127.0.0.1/32"]),
                ITEM_THUMBNAIL_MAX_SIDE="0",
            )
        )
        engine = sa.create_engine(url)
        exits.callback(engine.dispose)
        worker = BenchWorker(stack, f"{mode}-worker", concurrency=1)
        exits.callback(worker.close)
        prefix = f"bench-{mode}-"
        client = platform_client(stack.env["ITEM_BROKER_URL"], stack.prefix)
        wall = time.time()
        started = feed(client, prefix, plan, images, base, args.rate, stalls=mode != "no_stalls")
        fed_s = time.monotonic() - started
        deadline = time.monotonic() + args.drain_s
        while time.monotonic() < deadline:
            with engine.connect() as connection:
                left = connection.execute(NORMAL_LEFT_SQL, {"prefix": f"{prefix}n-%"}).scalar_one()
            if not left:
                break
            time.sleep(0.25)
        ended_s = time.monotonic() - started
        with engine.connect() as connection:
            rows = connection.execute(ROWS_SQL, {"prefix": prefix + "%"}).all()
        log = worker.log.read_text(errors="replace")
        if args.log:
            args.log.mkdir(parents=True, exist_ok=True)
            (args.log / f"{mode}-worker.log").write_text(log)
    return figures(rows, prefix, wall, fed_s, ended_s, log, args.rate)


def figures(rows, prefix: str, wall: float, fed_s: float, ended_s: float, log: str, rate: float) -> dict:
    normal = [row for row in rows if row.external_id.startswith(f"{prefix}n-")]
    stalled = [row for row in rows if row.external_id.startswith(f"{prefix}s-")]
    done = sorted(float(row.latency_s) for row in normal if row.status == "done")
    last = max((float(row.finished_s) for row in normal if row.finished_s is not None), default=wall)
    unfinished = sum(row.status not in ("done", "rejected", "failed") for row in normal)
    # All finished: from the first send to the last of them; else the whole run (feeding and the drain allowance).
    elapsed = ended_s if unfinished else last - wall
    return {
        "offered_per_s": rate,
        "sent": len(rows),
        "normal": len(normal),
        "done_per_s": len(done) / elapsed if elapsed else None,
        "p50_s": _quantile(done, 0.50),
        "p99_s": _quantile(done, 0.99),
        "unfinished": unfinished,
        "not_done": dict(Counter(f"{row.status}:{row.error_code}" for row in normal if row.status != "done")),
        "stalled": dict(Counter(f"{row.status}:{row.error_code}" if row.error_code else row.status for row in stalled)),
        "deferred": log.count("check deferred for"),
        "fed_s": fed_s,
        "elapsed_s": elapsed,
    }


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return values[min(len(values) - 1, int(q * len(values)))]


def run(args: argparse.Namespace, scratch: Path) -> dict:
    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = set(modes) - set(MODES)
    if unknown:
        raise SystemExit(f"unknown modes {sorted(unknown)}; known: {', '.join(MODES)}")
    store = tiny_models(args.model_dir or scratch / "models")
    n = int(args.rate * args.duration)
    images = [encode(noise_image(5_000_000 + i, 64 + i % 5 * 8, 72)) for i in range(n)]
    plan = traffic(n, args.seed)
    results = {mode: run_mode(mode, args, store, scratch, images, plan) for mode in modes}
    if "stalls" in results and "no_stalls" in results:
        with_stalls, without = results["stalls"], results["no_stalls"]
        results["ratio"] = _ratio(with_stalls["done_per_s"], without["done_per_s"])
        results["p50_ratio"] = _ratio(with_stalls["p50_s"], without["p50_s"])
        results["p99_ratio"] = _ratio(with_stalls["p99_s"], without["p99_s"])
    return results


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=120.0, help="Seconds of feeding per mode (120).")
    parser.add_argument("--rate", type=float, default=15.0, help="Checks sent per second (15).")
    parser.add_argument("--drain-s", type=float, default=60.0, help="Most seconds to wait after feeding (60).")
    parser.add_argument("--read-wait", type=float, default=1.0, help="ITEM_BATCH_READ_WAIT_S (1.0).")
    parser.add_argument("--batch-size", type=int, default=8, help="ITEM_BATCH_SIZE (8).")
    parser.add_argument("--modes", default="stalls,no_stalls", help="Comma list of " + ", ".join(MODES) + ".")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the traffic (0).")
    parser.add_argument("--model-dir", type=Path, help="Keep generated models here (default: a temporary folder).")
    parser.add_argument("--log", type=Path, help="Copy each mode's worker log into this folder.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": shlex.join(["python", "-m", "tests.bench.bench_slow_sources", *sys.argv[1:]]),
        "duration_s": args.duration,
        "rate": args.rate,
        "read_wait_s": args.read_wait,
        "fetch_timeout_s": FETCH_TIMEOUT_S,
        "batch_size": args.batch_size,
    }
    with tempfile.TemporaryDirectory() as scratch:
        result = rounded({**header, **run(args, Path(scratch))})
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['date']}  {result['machine']['cpus']} CPUs, {result['machine']['processor']}")
    print(f"{result['command']}  ({args.rate:g} checks/s for {args.duration:g} s, batch {args.batch_size}, tiny, CPU)")
    columns = ("done_per_s", "p50_s", "p99_s", "unfinished", "deferred")
    print(f"{'mode':16}" + "".join(f"{column:>12}" for column in columns) + "  stalled checks")
    for mode in MODES:
        if mode in result:
            cells = ("-" if result[mode][c] is None else result[mode][c] for c in columns)
            print(f"{mode:16}" + "".join(f"{cell:>12}" for cell in cells) + f"  {result[mode]['stalled']}")
    if "ratio" in result:
        print(f"ratio {result['ratio']}  p50 ratio {result['p50_ratio']}  p99 ratio {result['p99_ratio']}")


if __name__ == "__main__":
    main()
