"""The Python client platforms use: write the check to the ledger first, then send its message.

It needs a broker (`ITEM_BROKER_URL`) and loads no model library, so it starts in a blink. Without a broker the
checks can run in this process instead: that is `worker.runtime.submit_in_process`, which `item submit` picks
when no broker is configured.

A platform in another language can skip this and send the raw Celery message (task `item.check`, queue
`item.checks`, JSON kwargs `external_id` and `image`); the worker then creates the ledger row itself.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pipeline.core.errors import ItemError
from worker import sources
from worker.callbacks import checked_callback_url
from worker.ledger.models import CheckRow
from worker.ledger.store import Ledger
from worker.settings import CHECK_QUEUE, Settings


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
    """Records (external_id, image) pairs as queued checks of the active version, then sends their messages.

    With `callback_url`, each result is also POSTed there, signed with ITEM_CALLBACK_SECRET.
    """
    if not settings.broker_url:
        raise ItemError(
            "No broker is configured (ITEM_BROKER_URL): the client queues checks for workers. "
            "`item submit` runs them in-process instead when no broker is set.",
            code="broker.none",
        )
    callback_url = checked_callback_url(callback_url)
    ledger = Ledger(settings.database_url)
    try:
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
    finally:
        ledger.dispose()
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
    from worker.celery_app import make_celery, send_checks  # Celery only where a message is really sent

    send_checks(make_celery(settings), messages, queue)


def checks(settings: Settings, **filters) -> list[CheckRow]:
    ledger = Ledger(settings.database_url)
    try:
        with ledger.session() as session:
            return ledger.list_checks(session, **filters)
    finally:
        ledger.dispose()
