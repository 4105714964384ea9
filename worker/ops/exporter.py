"""The /metrics endpoint: every worker process's samples, plus what is read fresh at each scrape.

Each process of a worker (the Celery worker itself, each of its GPU processes) writes its own metric files;
`MultiProcessCollector` sums them, so a scrape sees the work of every process, not of whichever one answered.
Queue depth and stuck checks are not events any process observes: they are read from the broker and the ledger
at scrape time, and a scrape still answers (without them) when either is down. The broker's `item.checks` holds
only what the intake has not filed yet (milliseconds' worth while workers run); the work waiting is in the
ledger: `item_checks_waiting`, fresh uploads and re-scores apart.

Live gauges of a process that is gone (a GPU loop killed and replaced) are dropped at every scrape, so
`item_worker_ready` counts the processes alive now; this is the one place that forgets them.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

from worker.settings import CHECK_QUEUE, Settings

# prometheus_client and worker.ops.metrics are imported inside functions: prometheus_client picks its
# in-memory or multiprocess mode when first imported, which must come after prepare_multiprocess_dir().

log = logging.getLogger("item.metrics")

QUEUES = (CHECK_QUEUE,)  # every queue item_queue_depth reports, by its unprefixed name


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
    def __init__(self, settings: Settings):
        self.settings = settings
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
            WAITING_NAME, "Checks ready for a worker in the ledger, fresh uploads and re-scores.", labels=["priority"]
        )
        for priority, count in counts.get("waiting", {}).items():
            waiting.add_metric([priority], count)
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
            from worker.ledger.store import Ledger

            self._ledger = self._ledger or Ledger(self.settings.database_url)
            with self._ledger.session() as session:
                return {
                    "waiting": self._ledger.count_waiting(session),
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


class LiveProcessesCollector:
    """Every process's samples from the metric files, read only after the dead processes' gauges were dropped:
    the same scrape that follows a death no longer counts the dead."""

    def __init__(self):
        from prometheus_client.multiprocess import MultiProcessCollector

        self._files = MultiProcessCollector(None)  # not registered: collected through this

    def collect(self):
        _forget_dead_processes()
        yield from self._files.collect()


def registry(settings: Settings):
    from prometheus_client import REGISTRY, CollectorRegistry

    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        registry = REGISTRY  # one process: its own metrics
    else:
        registry = CollectorRegistry()
        registry.register(LiveProcessesCollector())
    registry.register(ScrapeTimeCollector(settings))
    return registry


def serve(settings: Settings) -> None:
    """Serves /metrics on a background thread of this process."""
    from prometheus_client import start_http_server

    start_http_server(settings.metrics_port, settings.metrics_addr, registry=registry(settings))
    log.info("metrics on http://%s:%d/metrics", settings.metrics_addr, settings.metrics_port)
