"""The Python client platforms use: write the check to the ledger first, then enqueue it.

A platform in another language can skip this and send the raw Celery message (task `item.check`, queue
`item.checks`, JSON kwargs `external_id` and `image`); the worker then creates the ledger row itself.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline.core.errors import ItemError
from worker import delivery, sources
from worker.ledger.models import CheckRow
from worker.ledger.store import Ledger
from worker.settings import CHECK_QUEUE, CHECK_TASK, Settings


@dataclass(frozen=True)
class Submission:
    check_id: str
    external_id: str
    created: bool  # False: this external id was already submitted under this pipeline version


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


def submit(settings: Settings, items: list[tuple[str, dict]], *, callback_url: str | None = None) -> list[Submission]:
    """Submits (external_id, image) pairs. With a broker they are queued; without one they run here, now.

    With `callback_url`, each result is also POSTed there, signed with ITEM_CALLBACK_SECRET.
    """
    callback_url = delivery.checked_callback_url(callback_url)
    if not settings.broker_url:
        return _run_here(settings, items, callback_url)
    ledger = Ledger(settings.database_url)
    version_id = active_version_id(ledger)
    messages, submissions = [], []
    with ledger.session() as session:
        for external_id, image in items:
            source = sources.to_stored(image, settings, partial(ledger.put_blob, session))
            check, created = ledger.create_check(
                session,
                external_id=external_id,
                pipeline_version_id=version_id,
                source=source,
                callback_url=callback_url,
            )
            submissions.append(Submission(check.id, external_id, created))
            if created:
                messages.append({"external_id": external_id, "image": source, "check_id": check.id})
    send(settings, messages, CHECK_QUEUE)  # after commit: a worker must find the row the message names
    return submissions


def active_version_id(ledger: Ledger) -> str:
    """The pipeline version new checks are made for: the one most recently activated (see `item versions`)."""
    with ledger.session() as session:
        version = ledger.active_version(session)
    if version is None:
        raise ItemError(
            "No pipeline version is registered yet: start a worker (`item worker`) once, so checks know which "
            "models and head will score them.",
            code="version.none",
        )
    return version.id


def send(settings: Settings, messages: list[dict], queue: str) -> None:
    """Sends `item.check` messages on one queue, over one broker connection."""
    if not messages:
        return
    from worker.celery_app import make_celery

    app = make_celery(settings)
    with app.producer_or_acquire() as producer:
        for kwargs in messages:
            app.send_task(CHECK_TASK, kwargs=kwargs, queue=queue, producer=producer)


def _run_here(settings: Settings, items: list[tuple[str, dict]], callback_url: str | None) -> list[Submission]:
    from worker.runtime import run_in_process

    messages = [{"external_id": e, "image": i, "callback_url": callback_url} for e, i in items]
    service = run_in_process(settings, messages)
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
        "rescore_of",
        "callback_url",
    )
    result = {field: getattr(row, field) for field in fields}
    for moment in ("created_at", "started_at", "finished_at"):
        value = getattr(row, moment)
        result[moment] = value.isoformat() if value else None
    return result
