"""The Python client platforms use: write the check to the ledger first, then enqueue it.

A platform in another language can skip this and send the raw Celery message (task `item.check`, queue
`item.checks`, JSON kwargs `external_id` and `image`); the worker then creates the ledger row itself.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import sqlalchemy as sa

from pipeline.errors import ItemError
from worker import sources
from worker.ledger.models import CheckRow, PipelineVersionRow
from worker.ledger.store import Ledger
from worker.settings import CHECK_QUEUE, CHECK_TASK, Settings


@dataclass(frozen=True)
class Submission:
    check_id: str
    external_id: str
    created: bool  # False: this external id was already submitted under this pipeline version


def image_from(reference: str, *, by_path: bool = False) -> dict:
    """The task's `image` object for a URL, or a local file (sent inline, or by path for shared disks)."""
    if "://" in reference:  # any URL goes to the worker, which refuses schemes other than http(s)
        return {"url": reference}
    path = Path(reference)
    if by_path:
        return {"path": str(path.resolve())}
    try:
        return {"b64": base64.b64encode(path.read_bytes()).decode()}
    except OSError as error:
        raise ItemError(f"{reference} cannot be read: {error}", code="file.unreadable") from None


def submit(settings: Settings, items: list[tuple[str, dict]]) -> list[Submission]:
    """Submits (external_id, image) pairs. With a broker they are queued; without one they run here, now."""
    if not settings.broker_url:
        return _run_here(settings, items)
    ledger = Ledger(settings.database_url)
    version_id = active_version_id(ledger)
    messages, submissions = [], []
    with ledger.session() as session:
        for external_id, image in items:
            source = sources.to_stored(image, settings, partial(ledger.put_blob, session))
            check, created = ledger.create_check(
                session, external_id=external_id, pipeline_version_id=version_id, source=source
            )
            submissions.append(Submission(check.id, external_id, created))
            if created:
                messages.append({"external_id": external_id, "image": source, "check_id": check.id})
    _send(settings, messages)  # after commit: a worker must find the row the message names
    return submissions


def active_version_id(ledger: Ledger) -> str:
    """The pipeline version new checks are made for: the one most recently registered by a worker."""
    with ledger.session() as session:
        version = session.scalar(
            sa.select(PipelineVersionRow.id).order_by(PipelineVersionRow.created_at.desc()).limit(1)
        )
    if version is None:
        raise ItemError(
            "No pipeline version is registered yet: start a worker (`item worker`) once, so checks know which "
            "models and head will score them.",
            code="version.none",
        )
    return version


def _send(settings: Settings, messages: list[dict]) -> None:
    if not messages:
        return
    from worker.celery_app import make_celery

    app = make_celery(settings)
    with app.producer_or_acquire() as producer:
        for kwargs in messages:
            app.send_task(CHECK_TASK, kwargs=kwargs, queue=CHECK_QUEUE, producer=producer)


def _run_here(settings: Settings, items: list[tuple[str, dict]]) -> list[Submission]:
    from worker.runtime import run_in_process

    service = run_in_process(settings, [{"external_id": e, "image": i} for e, i in items])
    with service.ledger.session() as session:
        rows = [service.ledger.find_check(session, external_id, service.version_id) for external_id, _ in items]
    return [Submission(row.id, row.external_id, True) for row in rows if row is not None]


def checks(settings: Settings, **filters) -> list[CheckRow]:
    ledger = Ledger(settings.database_url)
    with ledger.session() as session:
        return ledger.list_checks(session, **filters)


def check_dict(row: CheckRow) -> dict:
    """A check as platforms read it (`item status --json`, `item results --json`)."""
    fields = (
        "id",
        "external_id",
        "status",
        "attempts",
        "error_code",
        "error_message",
        "p_fake",
        "verdict",
        "threshold",
        "caption",
        "objects",
        "object_count",
        "image_sha256",
        "pipeline_version_id",
        "timings_ms",
    )
    result = {field: getattr(row, field) for field in fields}
    for moment in ("created_at", "started_at", "finished_at"):
        value = getattr(row, moment)
        result[moment] = value.isoformat() if value else None
    return result
