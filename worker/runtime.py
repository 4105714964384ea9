"""Wiring: settings → ledger + detector + head → a `CheckService`. One place, used by the worker, CLI and tests.

Also the embedded mode (no broker), where what a submission or a re-score files runs in this process.
"""

from __future__ import annotations

from worker.client import Submitted
from worker.delivery import Deliverer
from worker.intake import CheckRequest, Filed, Intake
from worker.ledger.states import TERMINAL_STATUSES
from worker.ledger.store import Ledger
from worker.loop import Loop
from worker.service import CheckService
from worker.settings import Settings

EMBEDDED_BACKOFF_MAX_S = 5.0  # a person waits at the terminal: retry delays are honoured, but capped
UNTRAINED_HEAD = "untrained"  # ITEM_HEAD / --head value: a seeded untrained head, for random-weight profiles only


def build_detector(settings: Settings):
    from pipeline.core.detector import Detector, untrained_head
    from pipeline.core.errors import HeadError
    from pipeline.core.head import Head
    from pipeline.core.model_store import ModelStore
    from pipeline.core.profiles import get_profile

    profile = get_profile(settings.profile)
    if settings.head is None:
        message = "No head given: set ITEM_HEAD (or pass --head to `item scan`); `item demo` trains a tiny one."
        raise HeadError(message, code="head.missing")
    untrained = str(settings.head) == UNTRAINED_HEAD
    if untrained and not profile.meaningless_scores:
        message = f"--head {UNTRAINED_HEAD} is only for random-weight profiles; {profile.name!r} needs a trained head."
        raise HeadError(message, code="head.untrained_refused")
    store = ModelStore(settings.model_dir, allow_download=settings.allow_download)
    head = None if untrained else Head.load(settings.head)
    detector = Detector(
        profile, store, head, settings.device, precision=settings.stage_precision,
        provenance_policy=settings.provenance_decides,
    )  # fmt: skip
    if untrained:  # random models: their scores mean nothing whatever the head, so an untrained one serves
        detector.use_head(untrained_head(detector))
    return detector


def build_service(settings: Settings) -> CheckService:
    return CheckService(settings, Ledger(settings.database_url), build_detector(settings))


class InProcess:
    """The embedded mode: checks are filed under this process's own version and run here, now.

    Its version becomes the active one when none is (an empty ledger); submissions are filed under it either way,
    since this process is the worker that will run them.
    """

    def __init__(self, settings: Settings, service: CheckService | None = None):
        self.service = service or build_service(settings)
        capped = min(self.service.settings.retry_backoff_max_s, EMBEDDED_BACKOFF_MAX_S)
        self.settings = self.service.settings = self.service.settings.model_copy(update={"retry_backoff_max_s": capped})
        self.service.register_version()
        self.intake = Intake(self.settings, self.service.ledger)
        self.deliverer = Deliverer(self.settings, self.service.ledger)
        self.loop = Loop(self.service)

    def submit(self, submissions: list[CheckRequest]) -> list[Filed]:
        """Files the submissions, runs them to their end, and sends the results that are due."""
        filed = self.intake.file(submissions, version_id=self.service.version_id)
        self.finish([one.check.id for one in filed])
        return filed

    def receive(self, external_id: str, image, callback_url: str | None = None) -> Filed:
        """One check as a message would bring it (the tests' and the embedded commands' unit of work)."""
        return self.submit([CheckRequest(external_id, image, callback_url)])[0]

    def finish(self, check_ids: list[str]) -> None:
        """Runs batches until every one of `check_ids` ended, then delivers what is due."""
        pending = set(check_ids)

        def finished() -> bool:
            with self.service.ledger.session() as session:
                rows = self.service.ledger.checks_by_id(session, sorted(pending))
            pending.difference_update(row.id for row in rows if row.status in TERMINAL_STATUSES)
            return not pending

        self.loop.run_until(finished)
        self.deliverer.deliver_all_due()  # results due now; retries scheduled for later stay in the outbox


def submit_in_process(
    settings: Settings, items: list[tuple[str, dict]], *, callback_url: str | None = None
) -> list[Submitted]:
    """`worker.client.submit` without a broker: the checks run here, now, under the version the settings make;
    each comes back with the status it ended in."""
    runner = InProcess(settings)
    filed = runner.submit([CheckRequest(external_id, image, callback_url) for external_id, image in items])
    ledger = runner.service.ledger
    with ledger.session() as session:
        ended = {row.id: row for row in ledger.checks_by_id(session, [one.check.id for one in filed])}
    return [Submitted.of(ended[one.check.id], one.created) for one in filed]
