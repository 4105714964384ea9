"""The /metrics endpoint: every worker process's samples, plus what is read fresh at each scrape.

Under Celery's prefork pool each process writes its own metric files; `MultiProcessCollector` sums them, so a
scrape sees the work of every process, not of whichever one answered. Queue depth and stuck checks are not
events any process observes: they are read from Redis and the ledger at scrape time, and a scrape still
answers (without them) when either is down. Queue depth covers both queues, fresh checks (`item.checks`) and
re-scores (`item.rescore`), read in one round trip.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from pathlib import Path

from worker.settings import CHECK_QUEUE, RESCORE_QUEUE, Settings

# prometheus_client and worker.metrics are imported inside functions: prometheus_client picks its
# in-memory or multiprocess mode when first imported, which must come after prepare_multiprocess_dir().

log = logging.getLogger("item.metrics")

QUEUES = (CHECK_QUEUE, RESCORE_QUEUE)  # every queue item_queue_depth reports, by its unprefixed name


def prepare_multiprocess_dir(settings: Settings) -> Path:
    """An empty folder for this host's metric files, exported as PROMETHEUS_MULTIPROC_DIR before any process
    imports prometheus_client's metrics (the mode is fixed at import)."""
    folder = Path(settings.metrics_dir or Path(os.environ.get("TMPDIR", "/tmp")) / f"item-metrics-{os.getpid()}")
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):  # samples of processes that no longer exist would be summed
        stale.unlink()  # the files, not the folder: it may be a mounted volume
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


class ScrapeTimeCollector:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._ledger = None

    def collect(self):
        from prometheus_client.core import GaugeMetricFamily

        from worker.metrics import QUEUE_DEPTH_NAME, STUCK_NAME

        depth = GaugeMetricFamily(QUEUE_DEPTH_NAME, "Messages waiting in the broker, per queue.", labels=["queue"])
        for queue, waiting in self._queue_depth().items():
            depth.add_metric([queue], waiting)
        yield depth
        stuck = GaugeMetricFamily(STUCK_NAME, "Checks queued/running past the reconcile threshold.", labels=["status"])
        for status, count in self._stuck().items():
            stuck.add_metric([status], count)
        yield stuck

    def _queue_depth(self) -> dict[str, int]:
        """Messages waiting per queue, all read in one round trip: all queues or, when Redis fails, none."""
        if not self.settings.broker_url:
            return {}
        try:
            import redis

            client = redis.Redis.from_url(self.settings.broker_url, socket_timeout=2, socket_connect_timeout=2)
            with client.pipeline(transaction=False) as pipe:
                for queue in QUEUES:
                    pipe.llen(f"{self.settings.redis_key_prefix}{queue}")
                lengths = pipe.execute()
            return {queue: int(length) for queue, length in zip(QUEUES, lengths, strict=True)}
        except Exception as error:  # a scrape must answer even when Redis does not
            log.warning("queue depth unavailable: %s", error)
            return {}

    def _stuck(self) -> dict[str, int]:
        try:
            from worker.ledger.store import Ledger

            self._ledger = self._ledger or Ledger(self.settings.database_url)
            with self._ledger.session() as session:
                return self._ledger.count_stuck(session, timedelta(seconds=self.settings.reconcile_after_s))
        except Exception as error:
            log.warning("stuck checks unavailable: %s", error)
            return {}


def registry(settings: Settings):
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        registry = REGISTRY  # one process: its own metrics
    else:
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    registry.register(ScrapeTimeCollector(settings))
    return registry


def serve(settings: Settings) -> None:
    """Serves /metrics on a background thread of this process."""
    from prometheus_client import start_http_server

    start_http_server(settings.metrics_port, settings.metrics_addr, registry=registry(settings))
    log.info("metrics on http://%s:%d/metrics", settings.metrics_addr, settings.metrics_port)
