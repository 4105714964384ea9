"""The Celery worker step of the upkeep threads every worker runs beside its intake and GPU loops.

deliverer    the outbox: signed callbacks and the results stream (worker.outbox.delivery)
reconciler   once per deployment, whoever holds the advisory lock (worker.ops.reconciler); off with
             `--no-reconcile`
/metrics     every process's samples, plus what is read at scrape time (worker.ops.exporter), on
             ITEM_METRICS_ADDR:ITEM_METRICS_PORT (0: off), with /readyz (503 while any part is dead) and /healthz

Each is a supervised thread (worker.ops.supervise): one that dies is logged, counted and restarted.
"""

from __future__ import annotations

import logging

from celery import bootsteps

from worker.settings import Settings

log = logging.getLogger("item.worker")


class Upkeep(bootsteps.StartStopStep):
    label = "item upkeep"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker, no_reconcile: bool = False, **kwargs):
        super().__init__(worker, **kwargs)
        self.reconcile = not no_reconcile
        self.deliverer = self.reconciler = self.metrics = None

    def start(self, worker) -> None:
        from worker.ledger.store import Ledger
        from worker.ops import exporter
        from worker.ops.reconciler import ReconcilerThread
        from worker.outbox.delivery import Deliverer

        settings: Settings = worker.app.item_settings
        ledger = Ledger(settings.database_url)
        _partitions_ahead(settings, ledger)
        if settings.metrics_port:
            self.metrics = exporter.serve(settings)
        self.deliverer = Deliverer(settings, ledger)
        self.deliverer.start()
        if self.reconcile:
            self.reconciler = ReconcilerThread(settings, ledger)
            self.reconciler.start()

    def stop(self, worker) -> None:
        settings: Settings = worker.app.item_settings
        if self.deliverer is not None:
            self.deliverer.stop(timeout=settings.callback_timeout_s + 5)
        if self.reconciler is not None:
            self.reconciler.stop()

    def info(self, worker) -> dict:
        threads = {"deliverer": self.deliverer, "reconciler": self.reconciler, "metrics": self.metrics}
        return {"item_upkeep": {name: _alive(thread) for name, thread in threads.items()}}


def _partitions_ahead(settings: Settings, ledger) -> None:
    """Every worker makes the ledger's partitions ahead as it starts (PostgreSQL), not only the reconciler's
    leader: a deployment whose workers all run --no-reconcile must not run out of days to insert into."""
    from worker.ledger.retention import ensure_partitions

    try:
        made = ensure_partitions(ledger.engine, settings.partitions_ahead_days)
    except Exception:  # the ledger is down, or a long reader holds a lock: the reconciler makes them later
        log.warning("could not make the ledger's partitions ahead", exc_info=True)
        return
    if made:
        log.info("made %d ledger partitions ahead: %s", len(made), ", ".join(made))


def _alive(part) -> str:
    if part is None:
        return "off"
    thread = getattr(part, "_thread", part)  # the deliverer and reconciler keep their Supervised thread inside
    return "alive" if thread is not None and thread.is_alive() else "dead"
