"""Leases through real workers, with the default lease: a killed worker's checks are redone within 30 s, a killed
GPU process is replaced and serves again, and a retry waits out its backoff before any worker claims it."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.brokers import free_port
from tests.integration.stack import Worker, make_stack
from worker.ledger.models import CheckRow
from worker.settings import Settings

DEFAULT_LEASE_S = Settings.model_fields["lease_s"].default
DEFAULT_IDLE_POLL_S = Settings.model_fields["idle_poll_s"].default


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    yield from make_stack(
        postgres_url,
        tiny_store,
        tmp_path_factory.mktemp("leases"),
        ITEM_LEASE_S=str(DEFAULT_LEASE_S),  # the defaults, not the short ones of the other stacks
        ITEM_IDLE_POLL_S=str(DEFAULT_IDLE_POLL_S),
        ITEM_RECONCILE_AFTER_S="120",
        ITEM_FETCH_ALLOWED_NETWORKS=json.dumps(["127.0.0.1/32"]),
        ITEM_RETRY_BACKOFF_S="2",
        ITEM_MAX_ATTEMPTS="3",
        ITEM_BATCH_SIZE="4",
    )


def _running_owners(stack, check_ids: list[str]) -> set[str]:
    with stack.ledger.session() as session:
        owners = session.scalars(
            sa.select(CheckRow.lease_owner).where(CheckRow.id.in_(check_ids), CheckRow.status == "running")
        )
        return set(owners)


def test_a_killed_workers_checks_are_redone_within_30_s(stack):
    doomed, survivor = Worker(stack, "doomed"), Worker(stack, "survivor")
    try:
        submitted = [s["check_id"] for s in stack.submit(*(str(stack.image(800 + i)) for i in range(24)))]
        doomed_pid = doomed.gpu_pids()[-1]
        deadline = time.monotonic() + 60
        while not any(owner.endswith(f":{doomed_pid}") for owner in _running_owners(stack, submitted)):
            assert time.monotonic() < deadline, "the doomed worker never held a batch"
            time.sleep(0.05)
        doomed.kill()  # SIGKILL, the Celery worker and its GPU process at once, mid-batch
        killed_at = time.monotonic()
        rows = stack.wait_terminal(submitted, timeout=90)
        redone_in = time.monotonic() - killed_at
        assert {row.status for row in rows.values()} == {"done"}
        assert redone_in <= 30, f"the killed worker's checks took {redone_in:.1f}s to be redone"
        taken_over = [row for row in rows.values() if row.attempts == 2]
        assert taken_over and all(not row.lease_owner.endswith(f":{doomed_pid}") for row in taken_over)
    finally:
        doomed.kill()
        survivor.stop()


def _workers_ready(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return sum(
        s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == "item_worker_ready"
    )


def test_a_killed_gpu_process_is_replaced_and_serves_again(stack):
    port = free_port()
    worker = Worker(
        stack, "replaced", env={**stack.env, "ITEM_METRICS_PORT": str(port), "ITEM_METRICS_ADDR": "127.0.0.1"}
    )
    try:
        log = worker.log.read_text()
        first = worker.gpu_pids()[-1]
        assert _workers_ready(port) == 1
        os.kill(first, signal.SIGKILL)
        killed_at = time.monotonic()
        time.sleep(1.5)
        assert _workers_ready(port) == 0  # the dead process no longer counts (ItemNoWorkerReady can fire)
        worker.wait_for(rf"GPU loop 0 \(pid (?!{first}\))\d+\) ready", 120)
        replaced_in = time.monotonic() - killed_at
        assert worker.process.poll() is None  # the Celery worker lived on
        assert _workers_ready(port) == 1
        assert "replacing it" in worker.log.read_text() and log != worker.log.read_text()
        assert replaced_in <= worker.started_in + 15, (replaced_in, worker.started_in)  # about one start-up
        check = stack.submit(str(stack.image(900)))[0]["check_id"]
        assert stack.wait_terminal([check], timeout=60)[check].status == "done"
    finally:
        worker.stop()


def test_a_retry_is_not_claimed_before_its_backoff(stack, images):
    worker = Worker(stack, "backoff")
    try:
        check = stack.submit(f"{images.url}/busy.png", "-e", "always-503")[0]["check_id"]
        row = stack.wait_terminal([check], timeout=90)[check]
        assert (row.status, row.error_code, row.attempts) == ("failed", "url.http_5xx", 3)
        times = [at for path, at in images.requests if path == "/busy.png"]
        gaps = [later - earlier for earlier, later in zip(times, times[1:], strict=False)]
        assert len(times) == 3
        # ITEM_RETRY_BACKOFF_S=2, doubling, jitter ×0.5–1.5: at least 1 s, then at least 2 s.
        assert gaps[0] >= 1.0 and gaps[1] >= 2.0, gaps
    finally:
        worker.stop()
