"""How long one claim takes on a big ledger: a million queued re-scores behind ten thousand fresh uploads.

Run on demand, never as a timed test (PostgreSQL as for the integration tests, `ITEM_TEST_POSTGRES_URL`):
    python -m tests.bench.bench_claim [--rescores 1000000 --fresh 10000 --claims 200 --batch 16 --json]
    python -m tests.bench.bench_claim --tenants 10   # the same rows spread over ten tenants: the fair claim

A new database, migrated with the real migrations, holds one pipeline version's checks, written server-side
(INSERT ... SELECT FROM generate_series, in chunks, with progress): --rescores queued re-scores (priority 1) of as
many done checks of an older version, and --fresh fresh checks (priority 0). Of each, one row in a thousand runs
under an expired lease (its worker died), one under a live lease, one is a retry not due for an hour, and one
used up its attempts; the rest are ready. After ANALYZE, `Ledger.claim` itself is timed (each claim its own
transaction, as a worker's), in phases, --claims claims each:

    fresh        priority 0, --batch at a time, fresh checks waiting
    any          priority None, --batch at a time, fresh checks waiting
    fresh-none   priority 0 with no fresh check ready: what each batch asks first during a re-score backlog
    rescore      priority 1, --rescore-batch at a time
    any-rescore  priority None with no fresh check ready: it has to reach the re-scores

Before `fresh-none` every fresh check still claimable is marked done; what a phase claims stays running (nothing
finishes it), so the checks in flight grow as the run goes on. Reports ms per claim (median, p95, max) per kind;
the same for a one-row write transaction, the floor under any claim (mostly the commit's WAL flush); and the
EXPLAIN (ANALYZE) of one claim of each kind, the statement `Ledger.claim` sent, run again in a transaction rolled
back: its plan nodes, the indexes it read, what it sorted; and the size of each index. A claim's time includes
its commit and loading its rows as objects. The machine's load average is reported too: other work on the
machine shows in the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import event

from tests.integration.conftest import POSTGRES_URL, temporary_postgres_database
from worker.ledger import migrate, tenants
from worker.ledger.claims import FairShare
from worker.ledger.states import Priority
from worker.ledger.store import Lease, Ledger

VERSION = "pv-bench-current"
OLD_VERSION = "pv-bench-previous"
MAX_ATTEMPTS = 5
CHUNK = 100_000  # rows per INSERT: progress every few seconds

# One row in a thousand of each kind: `i % 1000` picks it. The SQL below spells out what each one is.
_EXPIRED, _LIVE, _NOT_DUE, _USED_UP = 0, 1, 2, 3

_INSERT_DONE = f"""
INSERT INTO checks (id, external_id, pipeline_version_id, source, status, attempts, priority, p_fake, verdict,
                    threshold, object_count, created_at, enqueued_at, available_at, started_at, finished_at, updated_at)
SELECT md5('done-' || i)::uuid::text, 'post-' || i, '{OLD_VERSION}', '{{"url": "http://bench.invalid/i.jpg"}}',
       'done', 1, 0, 0.25, 'real', 0.5, 0, at, at, at, at, at, at
FROM (SELECT i, CAST(:start AS timestamptz) + i * interval '2 seconds' AS at
      FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS i) AS s
"""

_INSERT_QUEUED = f"""
INSERT INTO checks (id, external_id, pipeline_version_id, source, status, attempts, priority, rescore_of,
                    created_at, enqueued_at, available_at, started_at, updated_at,
                    lease_owner, lease_token, lease_expires_at, tenant_id)
SELECT gen_random_uuid()::text, :prefix || i, '{VERSION}', '{{"url": "http://bench.invalid/i.jpg"}}',
       CASE WHEN kind IN ({_EXPIRED}, {_LIVE}, {_USED_UP}) THEN 'running' ELSE 'queued' END,
       CASE kind WHEN {_USED_UP} THEN {MAX_ATTEMPTS} WHEN {_EXPIRED} THEN 1 WHEN {_LIVE} THEN 1
                 WHEN {_NOT_DUE} THEN 1 ELSE 0 END,
       CAST(:priority AS smallint),
       CASE WHEN CAST(:priority AS smallint) = {Priority.rescore} THEN md5('done-' || i)::uuid::text END,
       at, at,
       CASE kind WHEN {_NOT_DUE} THEN now() + interval '1 hour' ELSE at END,
       CASE WHEN kind IN ({_EXPIRED}, {_LIVE}, {_USED_UP}) THEN now() - interval '10 minutes' END,
       at,
       CASE WHEN kind IN ({_EXPIRED}, {_LIVE}, {_USED_UP}) THEN 'bench:1' END,
       CASE WHEN kind IN ({_EXPIRED}, {_LIVE}, {_USED_UP}) THEN gen_random_uuid()::text END,
       CASE kind WHEN {_LIVE} THEN now() + interval '10 minutes'
                 WHEN {_EXPIRED} THEN now() - interval '5 minutes'
                 WHEN {_USED_UP} THEN now() - interval '5 minutes' END,
       CASE WHEN CAST(:tenants AS int) > 1 THEN 'tenant-' || (i % CAST(:tenants AS int)) ELSE 'default' END
FROM (SELECT i, i % 1000 AS kind, CAST(:start AS timestamptz) + i * CAST(:step AS interval) AS at
      FROM generate_series(CAST(:first AS bigint), CAST(:last AS bigint)) AS i) AS s
"""

# Every fresh check a claim could still take, finished: what the phases after it see (fresh uploads all taken).
_DRAIN_FRESH = f"""
UPDATE checks SET status = 'done', finished_at = now(), lease_expires_at = NULL
WHERE pipeline_version_id = '{VERSION}' AND priority = {Priority.fresh} AND attempts < {MAX_ATTEMPTS}
  AND ((status = 'queued' AND available_at <= now()) OR (status = 'running' AND lease_expires_at < now()))
"""


# name: (priority, which limit); in the order they run.
KINDS = {
    "fresh": (Priority.fresh, "batch"),
    "any": (None, "batch"),
    "fresh-none": (Priority.fresh, "batch"),
    "rescore": (Priority.rescore, "rescore_batch"),
    "any-rescore": (None, "batch"),
}
_AFTER_THE_DRAIN = "fresh-none"


def run(args: argparse.Namespace) -> dict:
    with temporary_postgres_database(args.server_url) as url:
        migrate.upgrade(url)
        ledger = Ledger(url)
        try:
            insert_s = _filled(ledger, args)
            floor = _write_floor(ledger, args.claims)
            kinds = {name: _phase(ledger, name, args) for name in KINDS}
            return {
                "date": datetime.now(UTC).isoformat(timespec="seconds"),
                "load_average": [round(load, 2) for load in os.getloadavg()],  # others' work on the machine skews it
                "postgres": _scalar(ledger, "SHOW server_version"),
                "rows": _scalar(ledger, "SELECT count(*) FROM checks"),
                "rescores": args.rescores,
                "fresh": args.fresh,
                "tenants": args.tenants,
                "insert_s": round(insert_s, 1),
                "index_mb": _index_sizes(ledger),
                "write_floor_ms": floor,
                "kinds": kinds,
            }
        finally:
            ledger.dispose()


# ---------------------------------------------------------------------- the ledger


def _filled(ledger: Ledger, args: argparse.Namespace) -> float:
    """Writes the rows (see the module docstring), then ANALYZE; returns the seconds it took."""
    started = time.perf_counter()
    with ledger.engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO pipeline_versions (id, profile, caption, ground, embed, head, created_at, activated_at) "
                "VALUES (:old, 'tiny', 'c', 'g', 'e', 'h-old', now() - interval '90 days', now() - interval '90 days'),"
                " (:new, 'tiny', 'c', 'g', 'e', 'h-new', now() - interval '1 day', now() - interval '1 day')"
            ),
            {"old": OLD_VERSION, "new": VERSION},
        )
    if args.tenants > 1:
        with ledger.session() as session:
            for index in range(args.tenants):
                tenants.create_tenant(session, f"tenant-{index}")
    _insert(ledger, "done checks of the older version", _INSERT_DONE, args.rescores, {"start": _days_ago(60)})
    shared = {"tenants": args.tenants}
    rescores = {"prefix": "post-", "priority": Priority.rescore, "start": _days_ago(1), "step": "1 millisecond"}
    rescores |= shared
    _insert(ledger, "queued re-scores", _INSERT_QUEUED, args.rescores, rescores)
    fresh = {"prefix": "upload-", "priority": Priority.fresh, "start": _days_ago(1 / 24), "step": "300 milliseconds"}
    fresh |= shared
    _insert(ledger, "fresh checks", _INSERT_QUEUED, args.fresh, fresh)
    _progress("ANALYZE")
    with ledger.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql("ANALYZE checks")
    return time.perf_counter() - started


def _insert(ledger: Ledger, what: str, sql: str, count: int, params: dict) -> None:
    started = time.perf_counter()
    for first in range(0, count, CHUNK):
        last = min(first + CHUNK, count) - 1
        with ledger.engine.begin() as connection:
            connection.execute(sa.text(sql), {**params, "first": first, "last": last})
        _progress(f"{what}: {last + 1:,}/{count:,} ({time.perf_counter() - started:.1f} s)")


def _days_ago(days: float) -> datetime:
    return datetime.fromtimestamp(time.time() - days * 86400, UTC)


def _index_sizes(ledger: Ledger) -> dict[str, float]:
    query = (
        "SELECT indexrelname, pg_relation_size(indexrelid) FROM pg_stat_user_indexes "
        "WHERE relname = 'checks' ORDER BY indexrelname"
    )
    with ledger.engine.connect() as connection:
        return {name: round(size / 2**20, 1) for name, size in connection.exec_driver_sql(query)}


def _scalar(ledger: Ledger, sql: str):
    with ledger.engine.connect() as connection:
        return connection.exec_driver_sql(sql).scalar()


# ---------------------------------------------------------------------- claiming


def _phase(ledger: Ledger, name: str, args: argparse.Namespace) -> dict:
    """Times --claims claims of one kind, then explains the last one's statement."""
    if name == _AFTER_THE_DRAIN:
        _progress("marking every claimable fresh check done")
        with ledger.engine.begin() as connection:
            connection.exec_driver_sql(_DRAIN_FRESH)
    priority, limit_name = KINDS[name]
    limit = getattr(args, limit_name)
    _progress(f"{name}: {args.claims} claims of up to {limit} (priority {priority})")
    timings, taken = [], []
    with _claim_statements(ledger.engine) as sent:
        for _ in range(args.claims):
            started = time.perf_counter()
            taken.append(len(_claim(ledger, limit, priority)))
            timings.append(1000 * (time.perf_counter() - started))
    return {
        "priority": priority,
        "limit": limit,
        "claims": args.claims,
        "rows_per_claim": {"min": min(taken), "max": max(taken)},
        "ms": _summary(timings),
        "plan": _explained(ledger, *claims[-1]) if (claims := [one for one in sent if "UPDATE" in one[0]]) else None,
        "probe_plan": _explained(ledger, *probes[-1])
        if (probes := [one for one in sent if "UPDATE" not in one[0]])
        else None,
    }


def _write_floor(ledger: Ledger, times: int) -> dict[str, float]:
    """ms of the smallest write transaction (one row updated, committed) through the same engine: what any claim
    pays on this machine now, whatever its query, mostly the commit's flush of the WAL."""
    _progress(f"write floor: {times} one-row updates")
    statement = sa.text("UPDATE pipeline_versions SET activated_at = activated_at WHERE id = :id")
    timings = []
    for _ in range(times):
        started = time.perf_counter()
        with ledger.session() as session:
            session.execute(statement, {"id": VERSION})
        timings.append(1000 * (time.perf_counter() - started))
    return _summary(timings)


_FAIR = FairShare()  # one claimer's shares across tenants, kept from claim to claim as a GPU loop keeps its own


def _claim(ledger: Ledger, limit: int, priority: int | None) -> list:
    with ledger.session() as session:
        return ledger.claim(
            session,
            pipeline_version_id=VERSION,
            limit=limit,
            lease=Lease.new("bench:claim", 300),
            max_attempts=MAX_ATTEMPTS,
            priority=priority,
            fair=_FAIR,
        )


@contextmanager
def _claim_statements(engine: sa.Engine) -> Iterator[list[tuple[str, dict]]]:
    """The claim UPDATEs the engine sends meanwhile, and with several tenants the probe for those with work, as
    the driver got them (SQL text and parameters)."""
    sent: list[tuple[str, dict]] = []

    def record(_connection, _cursor, statement, parameters, _context, _many) -> None:
        if "UPDATE checks" in statement or "FROM tenants" in statement:
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)


def _summary(timings: list[float]) -> dict[str, float]:
    ordered = sorted(timings)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {"median": round(statistics.median(ordered), 2), "p95": round(p95, 2), "max": round(ordered[-1], 2)}


# ---------------------------------------------------------------------- plans


def _explained(ledger: Ledger, statement: str, parameters: dict) -> dict:
    """EXPLAIN (ANALYZE) of a claim statement, in a transaction rolled back after: it claims, then undoes it."""
    with ledger.engine.connect() as connection:
        transaction = connection.begin()
        try:
            result = connection.exec_driver_sql(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {statement}", parameters)
            [document] = result.scalar_one()
        finally:
            transaction.rollback()
    nodes = list(_nodes(document["Plan"]))
    return {
        "execution_ms": round(document["Execution Time"], 2),
        "planning_ms": round(document["Planning Time"], 2),
        "indexes": sorted({node["Index Name"] for _, node in nodes if "Index Name" in node}),
        "seq_scans": sorted({node["Relation Name"] for _, node in nodes if node["Node Type"] == "Seq Scan"}),
        "sorts": [_sort(node) for _, node in nodes if node["Node Type"] == "Sort"],
        "tree": [f"{'  ' * depth}{_node_line(node)}" for depth, node in nodes],
    }


def _nodes(plan: dict, depth: int = 0) -> Iterator[tuple[int, dict]]:
    yield depth, plan
    for child in plan.get("Plans", []):
        yield from _nodes(child, depth + 1)


def _node_line(node: dict) -> str:
    parts = [node["Node Type"]]
    if "Index Name" in node:
        parts.append(f"using {node['Index Name']}")
    if "Relation Name" in node:
        parts.append(f"on {node['Relation Name']}")
    if "CTE Name" in node:
        parts.append(f"({node['CTE Name']})")
    if "Subplan Name" in node:
        parts.append(f"[{node['Subplan Name']}]")
    parts.append(f"rows={node.get('Actual Rows', '?')} loops={node.get('Actual Loops', '?')}")
    parts.append(f"{node.get('Actual Total Time', '?')} ms")
    if "Rows Removed by Filter" in node:
        parts.append(f"removed={node['Rows Removed by Filter']}")
    return " ".join(parts)


def _sort(node: dict) -> dict:
    """What a Sort node sorted: its key and the rows it read (its own row count is what it let through)."""
    [child] = node["Plans"]
    rows = child.get("Actual Rows", 0) * child.get("Actual Loops", 1)
    return {"key": ", ".join(node.get("Sort Key", [])), "rows_in": rows, "method": node.get("Sort Method")}


# ---------------------------------------------------------------------- output


def _progress(message: str) -> None:
    print(f"[bench_claim] {message}", file=sys.stderr, flush=True)


def _text(report: dict) -> str:
    lines = [
        f"{report['date']}  PostgreSQL {report['postgres']}  {report['rows']:,} checks "
        f"({report['rescores']:,} re-scores, {report['fresh']:,} fresh), written in {report['insert_s']} s; "
        f"load average after {report['load_average']}",
        f"one-row write transaction (the floor of any claim): {report['write_floor_ms']} ms",
        "",
        f"{'kind':<12} {'prio':>4} {'limit':>5} {'rows':>7} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}",
    ]
    for name, kind in report["kinds"].items():
        rows = f"{kind['rows_per_claim']['min']}-{kind['rows_per_claim']['max']}"
        ms = kind["ms"]
        lines.append(
            f"{name:<12} {kind['priority']!s:>4} {kind['limit']:>5} {rows:>7} "
            f"{ms['median']:>10} {ms['p95']:>8} {ms['max']:>8}"
        )
    for name, kind in report["kinds"].items():
        plan = kind["plan"]
        lines += [
            "",
            f"{name}: {plan['execution_ms']} ms executing, {plan['planning_ms']} ms planning; "
            f"indexes {', '.join(plan['indexes']) or 'none'}; seq scans {', '.join(plan['seq_scans']) or 'none'}; "
            f"sorts {_sorts(plan['sorts'])}",
            *(f"    {line}" for line in plan["tree"]),
        ]
    lines += ["", "index sizes (MB): " + ", ".join(f"{name} {mb}" for name, mb in report["index_mb"].items())]
    return "\n".join(lines)


def _sorts(sorts: list[dict]) -> str:
    return "; ".join(f"{sort['key']} ({sort['rows_in']:,} rows in)" for sort in sorts) or "none"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rescores", type=int, default=1_000_000)
    parser.add_argument("--fresh", type=int, default=10_000)
    parser.add_argument("--claims", type=int, default=200, help="Claims timed per kind.")
    parser.add_argument("--batch", type=int, default=16, help="Limit of fresh and priority-None claims.")
    parser.add_argument("--rescore-batch", type=int, default=64, help="Limit of re-score claims.")
    parser.add_argument("--server-url", default=POSTGRES_URL, help="A server to make the temporary database on.")
    parser.add_argument("--tenants", type=int, default=1, help="Spread every queued check over this many tenants.")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    report = run(args)
    print(json.dumps(report, indent=2) if args.json else _text(report))


if __name__ == "__main__":
    main()
