"""Can one tenant's flood starve another? Tenant B's time to a result while tenant A's backlog drains.

A benchmark instrument, run on demand (never in the suite's timed assertions). A real `item worker` (Celery
intake, one GPU loop, Postgres ledger, Redis) with the `sim` profile's simulated device at `--rate` images a
second stands in for a GPU host; checks are filed straight into the ledger by the intake's own code (`Intake.file`,
what the Celery task and the HTTP API call), so the figures are the claim's, not a client's.

Phases, each on an empty backlog:
- `idle`: tenant B sends `--burst` checks at once; nothing else is queued.
- `fair`: tenant A floods `--flood` checks; once the loop is busy with them (`--head-start` seconds), B sends
  `--burst` checks. A and B have weight 1 each.
- `fifo`: the same, but B's checks are filed under A's tenant: one first-come-first-served queue, which is how
  the service claimed before tenants (and how a deployment with one tenant still does).

Figures: B's p50/p95/max seconds from filing to `done` in each phase, `fair_p95_over_idle` (the issue's goal:
at most 2), and A's backlog left when B's last check was done (A was still draining).

    python -m tests.bench.bench_fairness --json
    python -m tests.bench.bench_fairness --flood 5000 --burst 100 --rate 100 --batch-size 32
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import json
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.bench_feed import device_ms_for, jpeg, machine

TENANT_A, TENANT_B = "flooder", "quiet"
FILE_CHUNK = 500


def _percentiles(seconds: list[float]) -> dict[str, float]:
    ordered = sorted(seconds)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50_s": at(0.5), "p95_s": at(0.95), "max_s": ordered[-1], "n": len(ordered)}


class Bench:
    """The stack's ledger, seen from the platform's side: file checks as a tenant, wait for them, read timings.

    Every check sends bytes of its own: identical bytes are answered from the first check of them, without the
    models, which would make a flood cheaper than it is."""

    def __init__(self, url: str, settings, size: int):
        from worker.intake.filing import Intake
        from worker.ledger.store import Ledger

        self.ledger = Ledger(url)
        self.intake = Intake(settings, self.ledger)
        self.size = (size, size * 3 // 4)
        self.seed = 0

    def payload(self) -> dict:
        self.seed += 1
        return {"b64": base64.b64encode(jpeg(self.seed, self.size)).decode()}

    def file(self, tenant: str, prefix: str, n: int, payloads: list[dict] | None = None) -> list[str]:
        from worker.intake.filing import CheckRequest

        payloads = payloads or [self.payload() for _ in range(n)]  # made before filing: the checks arrive at once
        ids = []
        for start in range(0, n, FILE_CHUNK):
            requests = [CheckRequest(f"{prefix}-{i}", payloads[i]) for i in range(start, min(n, start + FILE_CHUNK))]
            ids += [one.check.id for one in self.intake.file(requests, tenant_id=tenant)]
        return ids

    def wait_done(self, ids: list[str], timeout_s: float) -> list[float]:
        """Seconds from filing to done of each of `ids`, once every one ended (all must be done)."""
        from worker.ledger.states import TERMINAL_STATUSES

        deadline = time.monotonic() + timeout_s
        while True:
            with self.ledger.session() as session:
                rows = self.ledger.checks_by_id(session, ids)
            ended = [row for row in rows if row.status in TERMINAL_STATUSES]
            if len(ended) == len(ids):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"{len(ids) - len(ended)} of {len(ids)} checks not ended after {timeout_s:.0f}s")
            time.sleep(0.1)
        not_done = [row for row in rows if row.status != "done"]
        if not_done:
            raise SystemExit(f"{len(not_done)} checks ended {not_done[0].status}: {not_done[0].error_code}")
        return [(row.finished_at - row.created_at).total_seconds() for row in rows]

    def queued(self, tenant: str) -> int:
        from worker.ledger import listing
        from worker.ledger.models import CheckRow

        with self.ledger.session() as session:
            return listing.capped_count(session, (CheckRow.tenant_id == tenant) & (CheckRow.status == "queued"), 10**7)


def run(args, scratch: Path) -> dict:
    from pipeline.core.model_store import ModelStore
    from tests.bench.bench_stack import BenchWorker
    from tests.integration.conftest import temporary_postgres_database
    from tests.integration.stack import make_stack
    from worker.ledger import tenants
    from worker.settings import load_settings

    store = ModelStore(args.model_dir or scratch / "models", allow_download=False)
    results: dict = {}
    with temporary_postgres_database() as url, contextlib.ExitStack() as exits:
        stack = exits.enter_context(
            contextlib.contextmanager(make_stack)(
                url, store, scratch,
                ITEM_PROFILE="sim", ITEM_HEAD="untrained", ITEM_DEVICE="cpu",
                ITEM_SIMULATED_DEVICE_MS=json.dumps(device_ms_for(args.rate)), ITEM_PREPARE_AHEAD="true",
                ITEM_BATCH_SIZE=str(args.batch_size), ITEM_BATCH_MAX_WAIT_S="0.02", ITEM_IDLE_POLL_S="0.05",
                ITEM_BATCH_TIME_BUDGET_S="600", ITEM_LEASE_S="60", ITEM_RECONCILE_AFTER_S="1200",
            )
        )  # fmt: skip
        settings = load_settings(database_url=url, max_b64_bytes=16 * 1024 * 1024)
        bench = Bench(url, settings, args.size)
        exits.callback(bench.ledger.dispose)
        with bench.ledger.session() as session:
            for tenant in (TENANT_A, TENANT_B):
                tenants.create_tenant(session, tenant)
        worker = BenchWorker(stack, "fairness-worker", concurrency=1)
        exits.callback(worker.close)
        bench.wait_done(bench.file(TENANT_B, "warm", args.batch_size * 2), timeout_s=600)
        results["idle"] = _percentiles(bench.wait_done(bench.file(TENANT_B, "idle", args.burst), 600))
        for phase, b_tenant in (("fair", TENANT_B), ("fifo", TENANT_A)):
            results[phase] = _contended(bench, args, phase, b_tenant)
    results["fair_p95_over_idle"] = results["fair"]["p95_s"] / results["idle"]["p95_s"]
    results["fifo_p95_over_idle"] = results["fifo"]["p95_s"] / results["idle"]["p95_s"]
    return results


def _contended(bench: Bench, args, phase: str, b_tenant: str) -> dict:
    """A floods, then B sends its burst (as `b_tenant`); B's timings, then A's drain."""
    flood_payloads = [bench.payload() for _ in range(args.flood)]
    burst_payloads = [bench.payload() for _ in range(args.burst)]
    started = time.monotonic()
    flood = bench.file(TENANT_A, f"{phase}-flood", args.flood, flood_payloads)
    filed_s = time.monotonic() - started
    time.sleep(args.head_start)
    burst = bench.file(b_tenant, f"{phase}-burst", args.burst, burst_payloads)
    figures = _percentiles(bench.wait_done(burst, timeout_s=1200))
    figures["a_queued_when_b_done"] = bench.queued(TENANT_A)
    bench.wait_done(flood, timeout_s=1200 + args.flood)
    figures["a_flood_filed_s"] = filed_s
    figures["a_drain_img_s"] = (args.flood + args.burst) / (time.monotonic() - started)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flood", type=int, default=5000, help="Checks tenant A floods (default 5000).")
    parser.add_argument("--burst", type=int, default=100, help="Checks tenant B sends at once (default 100).")
    parser.add_argument("--rate", type=float, default=100.0, help="Simulated img/s of the loop (default 100).")
    parser.add_argument("--batch-size", type=int, default=32, help="ITEM_BATCH_SIZE (default 32).")
    parser.add_argument("--size", type=int, default=256, help="Width of the JPEGs sent (default 256, 4:3).")
    parser.add_argument("--head-start", type=float, default=3.0, help="Seconds A's flood runs before B sends.")
    parser.add_argument("--model-dir", type=Path, help="Keep generated models here (default: a temporary folder).")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "command": shlex.join(["python", "-m", "tests.bench.bench_fairness", *sys.argv[1:]]),
        "settings": {key: value for key, value in vars(args).items() if key not in ("json", "model_dir")},
    }
    with tempfile.TemporaryDirectory() as scratch:
        from tests.bench.bench_stack import rounded

        result = rounded({**header, **run(args, Path(scratch)), "load_after": os.getloadavg()[0]})
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
