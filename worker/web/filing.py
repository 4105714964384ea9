"""Group commit for `POST /v1/checks`: concurrent requests share one intake transaction.

Each request costs the ledger a transaction of its own otherwise (the active version, an INSERT, a SELECT, a
NOTIFY, a commit with its WAL flush), and on a small machine those round trips, not Python, bound the rate. Here
one thread files whatever requests are waiting, up to MAX_BATCH, in one `Intake.file` call, then the next
ones: an idle server files a lone request at once (no added wait), a busy one files dozens per commit. A request
is answered only after its row has committed, exactly as before; if the transaction fails, every request in
it gets the error, and none of them was filed. Requests of several tenants waiting at once are filed in one
transaction per tenant (`Intake.file` files one tenant's checks), in the order the first of each arrived.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Future

from sqlalchemy.exc import InterfaceError, OperationalError

from pipeline.core.errors import ItemError
from worker.intake.filing import CheckRequest, Filed, Intake
from worker.ledger.models import DEFAULT_TENANT

log = logging.getLogger("item.web")
BROKEN_LEDGER = (OperationalError, InterfaceError, ItemError)  # the same for every request: no use filing singly
MAX_BATCH = 128  # requests per transaction: a few milliseconds of ledger work, whatever the arrival rate
FILE_TIMEOUT_S = 30.0  # a request waits no longer for its commit; a retry is safe (filing is idempotent)


class GroupFiler:
    def __init__(self, intake: Intake, max_batch: int = MAX_BATCH):
        self.intake, self.max_batch = intake, max_batch
        self._waiting: list[tuple[CheckRequest, str, Future]] = []
        self._ready = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="item-filer", daemon=True)
        self._thread.start()

    async def file(self, request: CheckRequest, tenant_id: str = DEFAULT_TENANT) -> Filed:
        """The request's check, filed for `tenant_id`, once the transaction that filed it has committed."""
        future: Future = Future()
        with self._ready:
            if self._stopped:
                raise RuntimeError("the server is stopping")
            self._waiting.append((request, tenant_id, future))
            self._ready.notify()
        return await asyncio.wait_for(asyncio.wrap_future(future), FILE_TIMEOUT_S)

    def stop(self) -> None:
        with self._ready:
            self._stopped = True
            self._ready.notify()
        self._thread.join(10)

    def _run(self) -> None:
        while True:
            with self._ready:
                while not self._waiting and not self._stopped:
                    self._ready.wait()
                if not self._waiting:  # stopped, and nothing left to file
                    return
                batch, self._waiting = self._waiting[: self.max_batch], self._waiting[self.max_batch :]
            per_tenant: dict[str, list[tuple[CheckRequest, Future]]] = {}
            for request, tenant_id, future in batch:
                per_tenant.setdefault(tenant_id, []).append((request, future))
            for tenant_id, requests in per_tenant.items():
                self._file(requests, tenant_id)

    def _file(self, batch: list[tuple[CheckRequest, Future]], tenant_id: str) -> None:
        try:
            requests = [request for request, _ in batch]  # over the tenant's quota: refused, not filed (429)
            filed = self.intake.file(requests, tenant_id=tenant_id, over_quota="refuse")
        except Exception as error:  # the ledger, or no version: each request answers with it
            if len(batch) > 1 and not isinstance(error, BROKEN_LEDGER):
                for one in batch:  # one poisonous request must not fail the others: each on its own
                    self._file([one], tenant_id)
                return
            log.warning("filing %d checks failed: %s", len(batch), type(error).__name__)
            for _, future in batch:
                future.set_exception(error)
            return
        for (_, future), one in zip(batch, filed, strict=True):
            future.set_result(one)
