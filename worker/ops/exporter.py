"""The /metrics endpoint: every worker process's samples, plus what is read fresh at each scrape.

Each process of a worker (the Celery worker itself, each of its GPU processes) writes its own metric files;
`MultiProcessCollector` sums them, so a scrape sees the work of every process, not of whichever one answered.
Queue depth and stuck checks are not events any process observes: they are read from the broker and the ledger
at scrape time, and a scrape still answers (without them) when either is down. The broker's `item.checks` holds
only what the intake has not filed yet (milliseconds' worth while workers run); the work waiting is in the
ledger: `item_checks_waiting`, fresh uploads and re-scores apart.

Live gauges of a process that is gone (a GPU loop killed and replaced) are dropped at every scrape, so
`item_worker_ready` counts the processes alive now; this is the one place that forgets them. While any
supervised part of the worker is dead (worker.ops.supervise), `item_worker_ready` reads 0 and /readyz 503.
Every count read at scrape time is capped (see `listing.COUNT_CAP`) and bounded in time: a scrape stays cheap
however large the ledger. Every `tenant` label is bounded here, at exposition (worker.ops.tenant_labels).
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

import sqlalchemy as sa

from worker.settings import CHECK_QUEUE, Settings

# prometheus_client and worker.ops.metrics are imported inside functions: prometheus_client picks its
# in-memory or multiprocess mode when first imported, which must come after prepare_multiprocess_dir().

log = logging.getLogger("item.metrics")

QUEUES = (CHECK_QUEUE,)  # every queue item_queue_depth reports, by its unprefixed name
SCRAPE_STATEMENT_MS = 2000  # longest a scrape's ledger query may run (Prometheus gives up on a scrape after 10 s)


def prepare_multiprocess_dir(settings: Settings) -> Path:
    """An empty folder for this host's metric files, exported as PROMETHEUS_MULTIPROC_DIR before any process
    imports prometheus_client's metrics (the mode is fixed at import)."""
    folder = Path(settings.metrics_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"item-metrics-{os.getpid()}")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # samples of processes that no longer exist would be summed
        stale.unlink()  # the files, not the folder: it may be a mounted volume
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


# The worker's long-lived threads, by thread name: 0 is one that died (or was turned off), for a dashboard to see.
WATCHED_THREADS = {
    "gpu_supervisor": "item-gpu-supervisor",
    "deliverer": "item-deliverer",
    "reconciler": "item-reconciler",
    "metrics": "item-metrics",
    "tenant_queues": "item-tenant-queues",  # the intake's refresher of tenants' queues (worker.intake.tenant_step)
}


def thread_liveness():
    """`item_worker_threads{thread}`: how many of each watched thread are alive in this (the worker's) process."""
    import threading

    from prometheus_client.core import GaugeMetricFamily

    from worker.ops.metrics import THREADS_NAME

    alive = [thread.name for thread in threading.enumerate() if thread.is_alive()]
    gauge = GaugeMetricFamily(THREADS_NAME, "The worker's long-lived threads alive now, by thread.", labels=["thread"])
    for label, name in WATCHED_THREADS.items():
        gauge.add_metric([label], alive.count(name))
    return gauge


class ScrapeTimeCollector:
    def __init__(self, settings: Settings, labels=None):
        from worker.ops.tenant_labels import TenantLabels

        self.settings = settings
        self.labels = labels or TenantLabels(settings)
        self._ledger = None

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from worker.ops.metrics import QUEUE_DEPTH_NAME, STUCK_NAME, WAITING_NAME

        depth = GaugeMetricFamily(
            QUEUE_DEPTH_NAME, "Messages in the broker the intake has not filed yet, per queue.", labels=["queue"]
        )
        for queue, waiting in self._queue_depth().items():
            depth.add_metric([queue], waiting)
        yield depth
        counts = self._ledger_counts()
        waiting = GaugeMetricFamily(
            WAITING_NAME,
            "Checks ready for a worker in the ledger, fresh uploads and re-scores, by tenant.",
            labels=["priority", "tenant"],
        )
        for (priority, tenant), count in counts.get("waiting", {}).items():
            waiting.add_metric([priority, tenant], count)
        yield waiting
        stuck = GaugeMetricFamily(
            STUCK_NAME, "Unfinished checks no worker moved for ITEM_RECONCILE_AFTER_S.", labels=["status"]
        )
        for status, count in counts.get("stuck", {}).items():
            stuck.add_metric([status], count)
        yield stuck
        yield thread_liveness()

    def _queue_depth(self) -> dict[str, int]:
        """Messages waiting in `item.checks` (Redis: its list; RabbitMQ: a passive declare); none when it fails."""
        if not self.settings.broker_url:
            return {}
        try:
            if self.settings.broker_url.startswith(("redis://", "rediss://")):
                return {CHECK_QUEUE: self._redis_length()}
            from worker.intake.broker import broker_connection

            with broker_connection(self.settings) as connection:
                _, messages, _ = connection.default_channel.queue_declare(CHECK_QUEUE, passive=True)
            return {CHECK_QUEUE: int(messages)}
        except Exception as error:  # a scrape must answer even when the broker does not
            log.warning("queue depth unavailable: %s", error)
            return {}

    def _redis_length(self) -> int:
        import redis

        client = redis.Redis.from_url(self.settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
        try:
            return int(client.llen(f"{self.settings.redis_key_prefix}{CHECK_QUEUE}"))
        finally:
            client.close()

    def _ledger_counts(self) -> dict[str, dict[str, int]]:
        try:
            from worker.ledger.listing import COUNT_CAP
            from worker.ledger.store import Ledger
            from worker.ops import tenant_labels

            self._ledger = self._ledger or Ledger(self.settings.database_url)
            with self._ledger.session() as session:
                if session.bind.dialect.name == "postgresql":  # a scrape answers within Prometheus' own timeout
                    session.execute(sa.text(f"SET LOCAL statement_timeout = {SCRAPE_STATEMENT_MS}"))
                return {
                    "waiting": tenant_labels.count_waiting(session, self.labels.chosen(), COUNT_CAP),
                    "stuck": self._ledger.count_stuck(session, timedelta(seconds=self.settings.reconcile_after_s)),
                }
        except Exception as error:
            log.warning("ledger counts unavailable: %s", error)
            return {}


def _forget_dead_processes() -> None:
    """Drops the live-gauge files of processes that no longer exist (see the module docstring)."""
    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not folder:
        return
    from prometheus_client import multiprocess

    for path in Path(folder).glob("gauge_live*_*.db"):
        pid = int(path.stem.rsplit("_", 1)[1])
        if not _alive(pid):
            multiprocess.mark_process_dead(pid, folder)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        pass
    return True


class ProcessesCollector:
    """The samples of this process, or of every process from the metric files, read only after the dead
    processes' gauges were dropped (the same scrape that follows a death no longer counts the dead); and
    `item_worker_ready` at 0 while any part of this worker is dead."""

    def __init__(self, multiprocess: bool, labels=None):
        from prometheus_client import REGISTRY
        from prometheus_client.multiprocess import MultiProcessCollector

        self._source = MultiProcessCollector(None) if multiprocess else REGISTRY  # collected through this
        self._multiprocess = multiprocess
        self._labels = labels  # folds the `tenant` label to its bounded values (None: as counted)

    def collect(self):
        from worker.ops.supervise import dead_parts

        if self._multiprocess:
            _forget_dead_processes()
        dead = dead_parts()
        families = self._source.collect()
        for family in self._labels.fold(families) if self._labels is not None else families:
            if family.name == "item_worker_ready" and dead:
                family.samples = [sample._replace(value=0.0) for sample in family.samples]
            yield family


def registry(settings: Settings):
    from prometheus_client import CollectorRegistry

    from worker.ops.tenant_labels import TenantLabels

    registry, labels = CollectorRegistry(), TenantLabels(settings)
    registry.register(ProcessesCollector(multiprocess="PROMETHEUS_MULTIPROC_DIR" in os.environ, labels=labels))
    registry.register(ScrapeTimeCollector(settings, labels))
    return registry


def serve(settings: Settings):
    """Serves /metrics, /readyz and /healthz on a supervised thread of this process; returns that thread.

    /readyz answers 503, naming them, while any watched part of this process is dead (worker.ops.supervise).
    """
    from http.server import ThreadingHTTPServer

    from worker.ops.supervise import Supervised

    server = ThreadingHTTPServer((settings.metrics_addr, settings.metrics_port), _handler(registry(settings)))
    server.daemon_threads = True
    thread = Supervised("metrics", server.serve_forever, wake=server.shutdown).start()
    log.info("metrics on http://%s:%d/metrics", settings.metrics_addr, settings.metrics_port)
    return thread


def _handler(metrics_registry):
    import json
    from http.server import BaseHTTPRequestHandler

    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from worker.ops.supervise import dead_parts

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, generate_latest(metrics_registry), CONTENT_TYPE_LATEST)
            elif path == "/readyz":
                dead = dead_parts()
                body = json.dumps({"ready": not dead, "dead": dead}).encode()
                self._send(503 if dead else 200, body, "application/json")
            elif path == "/healthz":
                self._send(200, b'{"alive": true}', "application/json")
            else:
                self._send(404, b"not found: /metrics, /readyz or /healthz\n", "text/plain")

        def _send(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:  # every scrape would be a log line
            pass

    return Handler
