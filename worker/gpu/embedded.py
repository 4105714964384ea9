"""The embedded mode (no broker): what a submission or a re-score files runs in this process, now."""

from __future__ import annotations

from worker.gpu.batches import CheckService
from worker.gpu.build import build_service
from worker.gpu.loop import Loop
from worker.intake.client import Submitted
from worker.intake.filing import CheckRequest, Filed, Intake
from worker.ledger.models import DEFAULT_TENANT
from worker.ledger.states import TERMINAL_STATUSES
from worker.outbox.delivery import Deliverer
from worker.settings import Settings

EMBEDDED_BACKOFF_MAX_S = 5.0  # a person waits at the terminal: retry delays are honoured, but capped


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

    def submit(self, submissions: list[CheckRequest], tenant_id: str = DEFAULT_TENANT) -> list[Filed]:
        """Files the submissions for `tenant_id` (which must exist and file: `tenant.unknown`, `tenant.disabled`),
        runs them to their end, and sends the results that are due."""
        filed = self.intake.file(submissions, version_id=self.service.version_id, tenant_id=tenant_id)
        self.finish([one.check.id for one in filed if one.conflict is None])
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
    settings: Settings,
    items: list[tuple[str, dict]],
    *,
    callback_url: str | None = None,
    tenant_id: str = DEFAULT_TENANT,
) -> list[Submitted]:
    """`worker.intake.client.submit` without a broker: the checks run here, now, under the version the settings make;
    each comes back with the status it ended in."""
    runner = InProcess(settings)
    requests = [CheckRequest(external_id, image, callback_url) for external_id, image in items]
    filed = runner.submit(requests, tenant_id)
    ledger = runner.service.ledger
    with ledger.session() as session:
        ended = {row.id: row for row in ledger.checks_by_id(session, [one.check.id for one in filed])}
    return [Submitted.of(ended[one.check.id], one.created, one.conflict) for one in filed]
