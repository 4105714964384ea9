"""How long converting an existing ledger to daily partitions (migration 0009) takes, and so how long it locks.

Run on demand (PostgreSQL as for the integration tests, `ITEM_TEST_POSTGRES_URL`):
    python -m tests.bench.bench_partition_migration [--rows 1000000 --days 30 --json]

A new database is migrated to 0008 and filled server-side with --rows finished checks spread over --days days,
each with a delivery and an image row, as a ledger before partitions held them; then `item db upgrade` to 0009
is timed. The migration runs in one transaction and holds ACCESS EXCLUSIVE on every table it converts until it
commits, so the time reported is how long the ledger is closed to reads and writes: stop the workers for it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import sqlalchemy as sa

from tests.integration.conftest import temporary_postgres_database
from worker.ledger import migrate

_FILL = """
WITH made AS (
  SELECT i, now() - (i * (:days * interval '1 day')) / :n AS at, md5(random()::text || i) AS h
  FROM generate_series(0, :n - 1) i
), checks AS (
  INSERT INTO checks (id, external_id, pipeline_version_id, source, image_sha256, status, attempts, priority,
                      p_fake, verdict, threshold, object_count, caption, created_at, enqueued_at, available_at,
                      started_at, finished_at, updated_at)
  SELECT h::uuid::text, 'upload-' || h, 'pv-migration', '{"url": "https://cdn.example.com/x.jpg"}', h || h, 'done',
         1, 0, 0.2, 'real', 0.5, 4, 'a brown dog catching a red frisbee on green grass', at, at, at, at,
         at + interval '2 seconds', at
  FROM made RETURNING id, created_at, image_sha256
), deliveries AS (
  INSERT INTO deliveries (id, check_id, target, status, attempts, body, next_attempt_at, created_at, updated_at)
  SELECT md5('d' || id)::uuid::text, id, 'stream', 'delivered', 1, '{"event": "item.check.finished"}', created_at,
         created_at, created_at
  FROM checks
)
INSERT INTO images (sha256, n_bytes, width, height, format, created_at)
SELECT image_sha256, 180000, 1024, 768, 'JPEG', created_at FROM checks
"""


def run(rows: int, days: int) -> dict:
    with temporary_postgres_database() as url:
        migrate.upgrade(url, "0008")
        engine = sa.create_engine(url)
        try:
            with engine.begin() as connection:
                connection.execute(
                    sa.text(
                        "INSERT INTO pipeline_versions (id, profile, caption, ground, embed, head, created_at) "
                        "VALUES ('pv-migration', 'bench', 'c', 'g', 'e', 'h', now())"
                    )
                )
                started = time.perf_counter()
                connection.execute(sa.text(_FILL), {"n": rows, "days": days})
                print(f"filled {rows:,} checks in {time.perf_counter() - started:.1f}s", file=sys.stderr)
                connection.exec_driver_sql("ANALYZE")
        finally:
            engine.dispose()
        started = time.perf_counter()
        migrate.upgrade(url, "0009")
        seconds = time.perf_counter() - started
    return {"rows": rows, "days": days, "upgrade_s": round(seconds, 1), "load_average": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="Finished checks in the ledger converted.")
    parser.add_argument("--days", type=int, default=30, help="Days they are spread over.")
    parser.add_argument("--json", action="store_true", help="One JSON object on stdout.")
    args = parser.parse_args()
    result = run(args.rows, args.days)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"0008 → 0009 on {result['rows']:,} checks over {result['days']} days: {result['upgrade_s']} s")


if __name__ == "__main__":
    main()
