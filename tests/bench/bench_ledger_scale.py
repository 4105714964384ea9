"""Does the ledger stay flat as it grows? The same churn and the same operator views at 10 thousand checks and at
--rows checks, on one partitioned PostgreSQL ledger.

Run on demand, never as a timed test (PostgreSQL as for the integration tests, `ITEM_TEST_POSTGRES_URL`):
    python -m tests.bench.bench_ledger_scale [--rows 10000000 --days 10 --churn-s 120 --json]

A new database, migrated with the real migrations, is filled server-side (INSERT ... SELECT FROM
generate_series, a day at a time, with progress) with finished checks of realistic width spread evenly over
--days days: a caption, four grounded objects, timings and provenance per check, its idempotency key, a
delivery of its result, an image row and a caption artifact; the operator views' rollups are filled from them.
Each size is measured the same way:

- churn for --churn-s seconds at the highest rate this machine allows: an intake thread files batches of
  --batch checks (`Ledger.create_checks`, as the broker intake does), keeping the backlog under four claims'
  worth, while --loops GPU-loop threads claim batches under a lease (`Ledger.claim`), renew the lease once,
  and finish them with a result, their deliveries and their rollups in one transaction (`finish_done_many`,
  `record_outcomes`), the models replaced by nothing;
- the statements behind the console's operations page, `item status` and `item versions`, after the churn;
- the claim indexes' size, the dead tuples and the share of HOT updates of the checks' partitions;
- table + index bytes per check over every partitioned table;
- at the end, the time to drop the oldest day of every partitioned table (`partitions.drop_day`).

The machine's load average is reported: other work on the machine shows in the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from datetime import timedelta

import sqlalchemy as sa

from tests.integration.conftest import temporary_postgres_database
from worker.ledger import listing, migrate, outbox, partitions, reviews
from worker.ledger.checks import NewCheck
from worker.ledger.models import utcnow
from worker.ledger.store import Lease, Ledger

VERSION = "pv-bench-scale"
SMALL = 10_000
_OBJECTS = (
    '[{"phrase": "a brown dog", "box": [12.5, 30.25, 200.0, 180.75], "score": 0.91, "misalignment": 0.31},'
    ' {"phrase": "a red frisbee", "box": [150.0, 20.0, 220.5, 70.0], "score": 0.77, "misalignment": 0.12},'
    ' {"phrase": "green grass", "box": [0.0, 150.0, 320.0, 240.0], "score": 0.66, "misalignment": 0.08},'
    ' {"phrase": "a wooden fence", "box": [0.0, 0.0, 320.0, 60.0], "score": 0.58, "misalignment": 0.22}]'
)
_RESULT = {
    "image_sha256": "a" * 64,
    "p_fake": 0.2,
    "verdict": "real",
    "threshold": 0.5,
    "caption": "a brown dog catching a red frisbee on green grass in front of a wooden fence",
    "objects": json.loads(_OBJECTS),
    "object_count": 4,
    "timings_ms": {"caption": 41.2, "ground": 63.9, "embed": 12.4, "head": 0.3},
}

# One day of `n` finished checks, their keys, deliveries, images and caption artifacts, made at :day + i/n days.
_FILL = """
WITH made AS (
  SELECT i, :day + (i * interval '1 day') / :n AS at, md5(random()::text || i) AS h FROM generate_series(0, :n - 1) i
), checks AS (
  INSERT INTO checks (id, external_id, pipeline_version_id, source, image_sha256, status, attempts, priority,
                      p_fake, verdict, verdict_reason, threshold, object_count, caption, objects, timings_ms,
                      provenance, callback_url, created_at, enqueued_at, available_at, started_at, finished_at,
                      updated_at)
  SELECT h::uuid::text, 'upload-' || h, :version, ('{"url": "https://cdn.example.com/u/' || h || '.jpg"}')::json,
         h || h, 'done', 1, 0, 0.2, 'real', 'score', 0.5, 4,
         'a brown dog catching a red frisbee on green grass in front of a wooden fence', :objects,
         '{"caption": 41.2, "ground": 63.9, "embed": 12.4, "head": 0.3}',
         '{"c2pa": null, "xmp_source_type": null, "declared": false}',
         'https://platform.example.com/hooks/item', at, at, at, at, at + interval '2 seconds', at
  FROM made RETURNING id, external_id, created_at, image_sha256
), keys AS (
  INSERT INTO check_keys (external_id, pipeline_version_id, day, check_id)
  SELECT external_id, :version, (created_at AT TIME ZONE 'UTC')::date, id FROM checks
), deliveries AS (
  INSERT INTO deliveries (id, check_id, check_created_at, target, status, attempts, body, next_attempt_at,
                          created_at, delivered_at, updated_at)
  SELECT md5('d' || id)::uuid::text, id, created_at, 'https://platform.example.com/hooks/item', 'delivered', 1,
         json_build_object('event', 'item.check.finished', 'check', json_build_object('id', id,
           'external_id', external_id, 'status', 'done', 'verdict', 'real', 'p_fake', 0.2,
           'objects', CAST(:objects AS json))),
         created_at, created_at, created_at, created_at
  FROM checks
), images AS (
  INSERT INTO images (sha256, n_bytes, width, height, format, created_at)
  SELECT image_sha256, 180000, 1024, 768, 'JPEG', date_trunc('day', created_at) FROM checks
)
INSERT INTO artifacts (sha256, kind, version_hash, version, payload, created_at)
SELECT image_sha256, 'caption', 'bench-caption', 'caption:blip2-opt-2.7b',
       '{"caption": "a brown dog catching a red frisbee on green grass in front of a wooden fence"}',
       date_trunc('day', created_at)
FROM checks
"""
_ROLLUPS = """
INSERT INTO check_rollups (minute, pipeline_version_id, status, verdict, priority, slot, n)
SELECT date_trunc('minute', finished_at), pipeline_version_id, status, coalesce(verdict, ''), priority, 0, count(*)
FROM checks WHERE status = 'done' GROUP BY 1, 2, 3, 4, 5
ON CONFLICT DO NOTHING
"""


def fill(ledger: Ledger, rows: int, days: int, already: int) -> None:
    """Adds finished checks until the ledger holds `rows`, spread over the `days` days before today."""
    per_day = max(1, (rows - already) // days)
    today = partitions.today()
    first = today - timedelta(days=days)
    with ledger.engine.begin() as connection:
        partitions.ensure_days(connection, first, today + timedelta(days=3))
    for offset in range(days):
        day = first + timedelta(days=offset)
        started = time.perf_counter()
        with ledger.engine.begin() as connection:
            values = {"day": partitions.day_start(day), "n": per_day, "version": VERSION, "objects": _OBJECTS}
            connection.execute(sa.text(_FILL).bindparams(sa.bindparam("day", type_=sa.DateTime(timezone=True))), values)
        print(f"  filled {day}: {per_day:,} checks in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    with ledger.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM check_rollups WHERE slot = 0 AND priority = 0 AND verdict = 'real'")
        connection.exec_driver_sql(_ROLLUPS)
        connection.exec_driver_sql("ANALYZE")


def churn(ledger: Ledger, seconds: float, loops: int, batch: int) -> dict:
    """Intake, claims and finishes at full speed for `seconds`; their latencies and counts."""
    stop = threading.Event()
    phase = uuid.uuid4().hex[:8]  # each phase files ids of its own: an id filed before would only be found again
    intake_ms, claim_ms, finish_ms, done = [], [], [], [0]
    sequence = [0]

    backlog_cap = 4 * batch * loops  # steady state: filing outruns finishing on 2 cores; a growing backlog would
    # make every count of queued checks (the operations page's, `item status`'s) grow with time, not with the ledger

    def intake() -> None:
        while not stop.is_set():
            if sequence[0] - done[0] > backlog_cap:
                time.sleep(0.005)
                continue
            source = {"url": "https://cdn.example.com/x.jpg"}
            ids = [NewCheck(f"churn-{phase}-{sequence[0] + n}", source) for n in range(batch)]
            sequence[0] += batch
            started = time.perf_counter()
            with ledger.session() as session:
                ledger.create_checks(session, VERSION, ids)
            intake_ms.append((time.perf_counter() - started) * 1000)

    def loop(index: int) -> None:
        lease = Lease.new(f"bench:{index}", 30)
        while not stop.is_set():
            started = time.perf_counter()
            with ledger.session() as session:
                claimed = ledger.claim(session, pipeline_version_id=VERSION, limit=batch, lease=lease, max_attempts=5)
            claim_ms.append((time.perf_counter() - started) * 1000)
            if not claimed:
                time.sleep(0.005)
                continue
            with ledger.session() as session:
                ledger.renew(session, lease)
            started = time.perf_counter()
            with ledger.session() as session:
                finished = ledger.finish_done_many(session, lease.token, {check.id: _RESULT for check in claimed})
                outbox.record_outcomes(session, finished, results_stream=True)
            finish_ms.append((time.perf_counter() - started) * 1000)
            done[0] += len(finished)

    threads = [threading.Thread(target=intake)] + [threading.Thread(target=loop, args=(i,)) for i in range(loops)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    time.sleep(seconds)
    stop.set()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    return {
        "done_per_s": round(done[0] / elapsed, 1),
        "filed_per_s": round(sequence[0] / elapsed, 1),
        "claim_ms": _percentiles(claim_ms),
        "intake_batch_ms": _percentiles(intake_ms),
        "finish_batch_ms": _percentiles(finish_ms),
    }


def views(ledger: Ledger, repeats: int = 5) -> dict:
    """Milliseconds (median of `repeats`) of the statements behind the operations page and `item status`."""

    def operations_page() -> None:
        now = utcnow()
        hour, day = now - timedelta(hours=1), now - timedelta(days=1)
        with ledger.session() as session:
            active = ledger.active_version(session)
            reviews.status_counts_since(session, hour)
            reviews.status_counts_since(session, day)
            reviews.finished_since(session, hour)
            ledger.count_waiting(session)
            reviews.latency_percentiles(session, hour)
            reviews.verdicts_per_version(session, day)
            reviews.workers_seen(session, timedelta(minutes=1))
            ledger.versions(session)
            if active is not None:
                reviews.rescore_counts(session, active.id)

    def item_status() -> None:
        with ledger.session() as session:
            listing.count_by_status(session)

    def item_versions() -> None:
        with ledger.session() as session:
            ledger.versions(session)
            ledger.checks_per_version(session)

    named = {"operations_page": operations_page, "item_status": item_status, "item_versions": item_versions}
    return {name: _median_ms(view, repeats) for name, view in named.items()}


def disk_and_churn_state(ledger: Ledger) -> dict:
    with ledger.engine.connect() as connection:
        checks = connection.execute(sa.text("SELECT count(*) FROM checks")).scalar_one()
        by_table = {
            table: connection.execute(
                sa.text(
                    "SELECT coalesce(sum(pg_total_relation_size(i.inhrelid)), 0) FROM pg_inherits i "
                    "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = :table"
                ),
                {"table": table},
            ).scalar_one()
            for table in partitions.PARTITIONED
        }
        stats = connection.execute(
            sa.text(
                "SELECT sum(n_dead_tup), sum(n_tup_upd), sum(n_tup_hot_upd) FROM pg_stat_user_tables "
                "WHERE relname LIKE 'checks\\_p%'"
            )
        ).one()
        claim_index_bytes = connection.execute(
            sa.text(
                "SELECT coalesce(sum(pg_relation_size(c.oid)), 0) FROM pg_class c "
                "WHERE c.relkind = 'i' AND (c.relname LIKE 'checks\\_p%pipeline_version_id_priority_created_at%')"
            )
        ).scalar_one()
    dead, updates, hot = (int(value or 0) for value in stats)
    return {
        "checks": checks,
        "bytes_per_check": round(sum(by_table.values()) / max(checks, 1)),
        "bytes_per_check_by_table": {table: round(size / max(checks, 1)) for table, size in by_table.items()},
        "dead_tuples_checks": dead,
        "hot_update_share": round(hot / updates, 3) if updates else None,
        "claim_index_bytes": int(claim_index_bytes),
    }


def drop_oldest_day(ledger: Ledger) -> dict:
    with ledger.engine.connect() as connection:
        oldest = partitions.partition_days(connection, "checks")[0]
    timings = {}
    for table in partitions.PARTITIONED:
        started = time.perf_counter()
        with ledger.engine.begin() as connection:
            partitions.drop_day(connection, table, oldest)
        timings[table] = round((time.perf_counter() - started) * 1000, 1)
    return {"day": oldest.isoformat(), "ms_per_table": timings, "ms_total": round(sum(timings.values()), 1)}


def measure(ledger: Ledger, args) -> dict:
    result = {"churn": churn(ledger, args.churn_s, args.loops, args.batch)}
    with ledger.engine.connect() as connection:
        connection.exec_driver_sql("SELECT pg_stat_force_next_flush()")
    result["views_ms"] = views(ledger)
    result["state"] = disk_and_churn_state(ledger)
    return result


def run(args) -> dict:
    with temporary_postgres_database() as url:
        migrate.upgrade(url)
        ledger = Ledger(url)
        try:
            with ledger.engine.begin() as connection:
                connection.execute(
                    sa.text(
                        "INSERT INTO pipeline_versions (id, profile, caption, ground, embed, head, created_at, "
                        "activated_at) VALUES (:id, 'bench', 'c', 'g', 'e', 'h', now(), now())"
                    ),
                    {"id": VERSION},
                )
            print(f"filling {SMALL:,} checks", file=sys.stderr)
            fill(ledger, SMALL, args.days, 0)
            small = measure(ledger, args)
            print(f"filling up to {args.rows:,} checks", file=sys.stderr)
            fill(ledger, args.rows, args.days, small["state"]["checks"])
            large = measure(ledger, args)
            dropped = drop_oldest_day(ledger)
        finally:
            ledger.dispose()
    return {
        "rows": args.rows,
        "days": args.days,
        "churn_s": args.churn_s,
        "loops": args.loops,
        "batch": args.batch,
        "load_average": os.getloadavg(),
        "small": small,
        "large": large,
        "drop_one_day": dropped,
        "ratios_large_to_small": _ratios(small, large),
    }


def _ratios(small: dict, large: dict) -> dict:
    pairs = {
        "claim_p50": ("churn", "claim_ms", "p50"),
        "claim_p99": ("churn", "claim_ms", "p99"),
        "intake_p99": ("churn", "intake_batch_ms", "p99"),
        "operations_page": ("views_ms", "operations_page", None),
        "item_status": ("views_ms", "item_status", None),
        "item_versions": ("views_ms", "item_versions", None),
    }
    ratios = {}
    for name, (group, key, quantile) in pairs.items():
        a, b = small[group][key], large[group][key]
        if quantile is not None:
            a, b = a[quantile], b[quantile]
        ratios[name] = round(b / a, 2) if a else None
    return ratios


def _percentiles(values: list[float]) -> dict:
    if not values:
        return {"n": 0, "p50": None, "p99": None}
    ordered = sorted(values)
    return {
        "n": len(values),
        "p50": round(statistics.median(ordered), 2),
        "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
    }


def _median_ms(call, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000_000, help="Checks in the large ledger.")
    parser.add_argument("--days", type=int, default=10, help="Days the loaded checks are spread over.")
    parser.add_argument("--churn-s", type=float, default=120.0, help="Seconds of churn at each size.")
    parser.add_argument("--loops", type=int, default=2, help="GPU-loop threads claiming and finishing.")
    parser.add_argument("--batch", type=int, default=32, help="Checks per intake batch and per claim.")
    parser.add_argument("--json", action="store_true", help="One JSON object on stdout.")
    args = parser.parse_args()
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    for size in ("small", "large"):
        print(size, json.dumps(result[size]))
    print("drop one day", json.dumps(result["drop_one_day"]))
    print("ratios large/small", json.dumps(result["ratios_large_to_small"]))


if __name__ == "__main__":
    main()
