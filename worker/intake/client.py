"""The Python client platforms use: checks are filed in the ledger, where the workers claim them.

It loads no model library, so it starts in a blink. It is for a running service (`ITEM_BROKER_URL` set, workers
up); without a broker the checks can run in this process instead: `worker.gpu.embedded.submit_in_process`, which
`item submit` picks when no broker is configured.

A platform in another language (or without ledger access) sends the Celery message instead (task `item.check`,
queue `item.checks`, JSON kwargs `external_id` and `image`); the workers' intake files it the same way.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import ItemError
from worker.intake.filing import CheckRequest, Intake
from worker.ledger.models import DEFAULT_TENANT, CheckRow
from worker.ledger.store import Ledger
from worker.settings import Settings
from worker.sources import kinds as sources


@dataclass(frozen=True)
class Submitted:
    check_id: str
    external_id: str
    created: bool  # False: this external id was already submitted under this pipeline version
    status: str  # queued, or rejected at once (bad source, bad callback URL); the final one when run in-process;
    # `conflict` when the external id names another image's check (`check_id`): nothing was filed
    error_code: str | None = None
    error_message: str | None = None

    @classmethod
    def of(cls, check: CheckRow, created: bool, conflict: ItemError | None = None) -> Submitted:
        if conflict is not None:  # never the other image's status or result, as if it were this one's
            return cls(check.id, check.external_id, False, "conflict", conflict.code, conflict.message)
        return cls(check.id, check.external_id, created, str(check.status), check.error_code, check.error_message)


def image_from(reference: str, *, by_path: bool = False) -> dict:
    """The task's `image` object for an s3:// reference, a URL, or a local file (inline, or by path)."""
    if reference.startswith("s3://"):
        return {"s3": sources.parse_s3_uri(reference)}
    if "://" in reference:  # any URL goes to the worker, which refuses schemes other than http(s)
        return {"url": reference}
    path = Path(reference)
    if by_path:
        return {"path": str(path.resolve())}
    try:
        return {"b64": base64.b64encode(path.read_bytes()).decode()}
    except OSError as error:
        raise ItemError(f"{reference} cannot be read: {error}", code="file.unreadable") from None


def submit(
    settings: Settings,
    items: list[tuple[str, dict]],
    *,
    callback_url: str | None = None,
    tenant_id: str = DEFAULT_TENANT,
) -> list[Submitted]:
    """Files (external_id, image) pairs as checks of `tenant_id` under its version (the active one unless the tenant
    is pinned), for the workers to claim.

    With `callback_url`, each result is also POSTed there, signed with ITEM_CALLBACK_SECRET.
    """
    if not settings.broker_url:
        raise ItemError(
            "No broker is configured (ITEM_BROKER_URL): the client files checks for a running service. "
            "`item submit` runs them in-process instead when no broker is set.",
            code="broker.none",
        )
    ledger = Ledger(settings.database_url)
    try:
        requests = [CheckRequest(external_id, image, callback_url) for external_id, image in items]
        filed = Intake(settings, ledger).file(requests, tenant_id=tenant_id)
        return [Submitted.of(one.check, one.created, one.conflict) for one in filed]
    finally:
        ledger.dispose()


def checks(settings: Settings, **filters) -> list[CheckRow]:
    """Checks of the ledger, newest first (`listing.list_checks`'s filters: `tenant_id` narrows to one tenant)."""
    ledger = Ledger(settings.database_url)
    try:
        with ledger.session() as session:
            return ledger.list_checks(session, **filters)
    finally:
        ledger.dispose()
