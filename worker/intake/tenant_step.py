"""The worker step that keeps the intake consuming every tenant's queue, tenants added later included.

    tenants table ──every ITEM_TENANT_REFRESH_S── the refresher thread ──call_soon──▶ the consumer's thread:
                                                  (supervised)                      select the queue, consume it

`item.checks` (the default tenant's) is consumed from the start, as before tenants. Every other tenant's queue
(`item.checks.<t>`, worker.intake.queues) is added once the refresher has read the tenant, at start and then every
ITEM_TENANT_REFRESH_S: a tenant created while the workers run has its queue consumed within that time, with no
restart. The queue is added on the consumer's own thread (kombu's connections are not shared between threads) and
selected in Celery's queues, so a consumer that reconnects after a broker restart consumes it again. A disabled
tenant's queue is still consumed: its messages become dead letters (`tenant.disabled`), never a backlog that
nobody reads. A worker started with `--no-intake` consumes none.
"""

from __future__ import annotations

import logging
import threading

from celery import bootsteps

from worker.intake.queues import queue_name, tenant_of_queue, tenant_queue
from worker.settings import CHECK_QUEUE, Settings

log = logging.getLogger("item.intake")


class TenantQueues(bootsteps.StartStopStep):
    label = "item tenant queues"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker, no_intake: bool = False, **kwargs):
        super().__init__(worker, **kwargs)
        self.enabled = not no_intake
        self.refresher: QueueRefresher | None = None
        self._thread = None

    def start(self, worker) -> None:
        from worker.ops.supervise import Supervised

        if not self.enabled:
            return
        self.refresher = QueueRefresher(worker.app.item_settings, worker)
        self._thread = Supervised("tenant-queues", self.refresher.run, stopping=self.refresher.stopping).start()

    def stop(self, worker) -> None:
        if self._thread is not None:
            self._thread.stop(timeout=5)
        if self.refresher is not None:
            self.refresher.close()

    def info(self, worker) -> dict:
        return {"item_tenant_queues": sorted(self.refresher.consumed) if self.refresher else []}


class QueueRefresher:
    """Reads the tenants and has the consumer take every one's queue; `consumed` is what it took so far."""

    def __init__(self, settings: Settings, worker):
        self.settings, self.worker = settings, worker
        self.stopping = threading.Event()
        self.consumed: set[str] = {CHECK_QUEUE}
        self._ledger = None

    def run(self) -> None:
        while not self.stopping.is_set():
            self.refresh_once()
            self.stopping.wait(self.settings.tenant_refresh_s)

    def refresh_once(self) -> list[str]:
        """The queues asked of the consumer this time (their tenants are new to it); none while the ledger is down."""
        from worker.ledger.engine import INFRASTRUCTURE_ERRORS
        from worker.ledger.tenants import tenant_ids

        try:
            with self.ledger().session() as session:
                wanted = {queue_name(tenant_id) for tenant_id in tenant_ids(session)}
        except INFRASTRUCTURE_ERRORS as error:  # the next pass tries again; the queues consumed go on
            log.warning("cannot read the tenants (%s); their queues are looked for again later", error)
            return []
        new = sorted(wanted - self.consumed)
        consumer = getattr(self.worker, "consumer", None)
        for name in new if consumer is not None else ():
            consumer.call_soon(self._consume, consumer, name)  # asked again next pass until it has run
        return new

    def _consume(self, consumer, name: str) -> None:
        """On the consumer's thread: select the queue (a reconnection consumes it too) and consume it now."""
        if name in self.consumed:
            return
        consumer.app.amqp.queues.select_add(tenant_queue(tenant_of_queue(name)))
        try:
            if consumer.task_consumer is not None:  # else the consumer starts (or restarts) with it selected
                consumer.add_task_queue(name)
        except Exception:  # the connection is going (it comes back consuming it) or the broker refused: next pass
            log.warning("could not consume %s yet", name, exc_info=True)
            return
        self.consumed.add(name)
        log.info("intake consuming %s (tenant %s)", name, tenant_of_queue(name))

    def ledger(self):
        if self._ledger is None:
            from worker.ledger.store import Ledger

            self._ledger = Ledger(self.settings.database_url)
        return self._ledger

    def close(self) -> None:
        if self._ledger is not None:
            self._ledger.dispose()
