"""A small chaos run in the suite (`tests/bench/bench_chaos.py` runs the big one): checks from a platform's Celery
client while a worker is SIGKILLed, the broker restarts, Postgres is cut off and the fleet is upgraded."""

from __future__ import annotations

from tests.bench.bench_chaos import Chaos, run
from tests.integration.conftest import POSTGRES_URL


def test_nothing_is_lost_duplicated_or_stuck_under_faults(tiny_store, tmp_path):
    chaos = Chaos(checks=160, workers=2, kills=1, broker="redis-aof", send_seconds=12, timeout_s=300)
    report = run(chaos, tmp_path, POSTGRES_URL, tiny_store)
    for fault in ("SIGKILL", "broker killed", "Postgres cut off", "rolling upgrade"):  # every fault happened
        assert any(fault in event for event in report.events), (fault, report.events)
    assert (report.lost, report.duplicated, report.stuck) == (0, 0, 0), report
    assert report.sent == chaos.checks and report.done + report.rejected + report.failed == chaos.checks, report
