"""Wiring: settings → ledger + detector + head → a `CheckService`. One place, used by tasks, CLI and tests.

Also the embedded mode (no broker), where the messages a submission or a re-score makes run in this process.
"""

from __future__ import annotations

import time
from collections import deque

from pipeline.core.detector import Detector
from pipeline.core.errors import HeadError
from pipeline.core.head import Head
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from worker.callbacks import checked_callback_url
from worker.client import Submission
from worker.delivery import Deliverer
from worker.ledger.store import Ledger
from worker.service import CheckService, Enqueue
from worker.settings import Settings


def build_detector(settings: Settings) -> Detector:
    if settings.head is None:
        message = "No head given: set ITEM_HEAD (or pass --head to `item scan`); `item demo` trains a tiny one."
        raise HeadError(message, code="head.missing")
    store = ModelStore(settings.model_dir, allow_download=settings.allow_download)
    return Detector(get_profile(settings.profile), store, Head.load(settings.head), settings.device)


def build_service(settings: Settings, enqueue: Enqueue) -> CheckService:
    service = CheckService(settings, Ledger(settings.database_url), build_detector(settings), enqueue)
    service.register_version()
    return service


class InProcess:
    """The embedded mode (no broker): messages, and every retry they ask for, run here and now.

    Retry delays are honoured but capped at a few seconds: a person is waiting at the terminal.
    """

    def __init__(self, settings: Settings):
        self.pending: deque[tuple[dict, float]] = deque()
        self.service = build_service(settings, self._enqueue)
        self.deliverer = Deliverer(settings, self.service.ledger)

    def _enqueue(self, kwargs: dict, countdown: float, queue: str) -> None:
        self.pending.append((kwargs, countdown))

    def run(self, messages: list[dict]) -> None:
        self.pending.extend((message, 0.0) for message in messages)
        while self.pending:
            message, countdown = self.pending.popleft()
            time.sleep(min(countdown, 5.0))
            self.service.receive(**message)
        self.deliverer.deliver_all_due()  # results due now; retries scheduled for later stay in the outbox


def run_in_process(settings: Settings, messages: list[dict]) -> CheckService:
    """Runs `messages` through a service built here (see `InProcess`); returns the service."""
    runner = InProcess(settings)
    runner.run(messages)
    return runner.service


def submit_in_process(
    settings: Settings, items: list[tuple[str, dict]], *, callback_url: str | None = None
) -> list[Submission]:
    """`worker.client.submit` without a broker: the checks run here, now, under the version the settings make."""
    callback_url = checked_callback_url(callback_url)
    messages = [{"external_id": e, "image": i, "callback_url": callback_url} for e, i in items]
    service = run_in_process(settings, messages)
    with service.ledger.session() as session:
        rows = [service.ledger.find_check(session, external_id, service.version_id) for external_id, _ in items]
    return [Submission(row.id, row.external_id, True) for row in rows if row is not None]
