"""Pushing results back to platforms: signed callbacks and a results stream, from an outbox in the ledger.

(Being written: the interface below is what the service calls.)
"""

from __future__ import annotations

from sqlalchemy.orm import Session

from worker.ledger.models import CheckRow
from worker.settings import Settings


def checked_callback_url(url: str | None) -> str | None:
    """The callback URL if its shape is acceptable (http(s), a host, no credentials); raises ItemError if not."""
    return url


def record_outcome(session: Session, check: CheckRow, settings: Settings) -> int:
    """Queues the finished check's result for every configured target, in the caller's transaction."""
    return 0
