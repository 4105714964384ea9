"""Ledger rows as platforms and operators read them: the JSON of `item status|results --json`, of callbacks
and the results stream, and of `item deliveries list --json`."""

from __future__ import annotations

from datetime import datetime

from worker.ledger.models import CheckRow, DeliveryRow
from worker.ledger.states import STREAM_TARGET, DeliveryStatus
from worker.sources.fetch import FetchError, parse_target

CHECK_FIELDS = (
    "id",
    "external_id",
    "status",
    "attempts",
    "error_code",
    "error_message",
    "p_fake",
    "verdict",
    "verdict_reason",
    "threshold",
    "threshold_low",
    "caption",
    "objects",
    "object_count",
    "attribution",
    "provenance",
    "media",
    "reused_from",
    "match",
    "image_sha256",
    "pipeline_version_id",
    "timings_ms",
    "rescore_of",
    "callback_url",
)


def check_dict(row: CheckRow) -> dict:
    """A check as platforms read it (`item status --json`, `item results --json`, callbacks)."""
    result = {field: getattr(row, field) for field in CHECK_FIELDS}
    for moment in ("created_at", "started_at", "finished_at"):
        result[moment] = as_time(getattr(row, moment))
    return result


def delivery_dict(row: DeliveryRow) -> dict:
    """A delivery as `item deliveries list --json` shows it (the target without its query)."""
    return {
        "id": row.id,
        "check_id": row.check_id,
        "kind": target_kind(row.target),
        "target": shown_target(row.target),
        "status": DeliveryStatus(row.status).value,
        "attempts": row.attempts,
        "last_error": row.last_error,
        **{moment: as_time(getattr(row, moment)) for moment in ("created_at", "next_attempt_at", "delivered_at")},
    }


def target_kind(target: str) -> str:
    return "stream" if target == STREAM_TARGET else "callback"


def shown_target(target: str) -> str:
    """The target for logs and tables: a URL without its query, which may hold a token."""
    if target == STREAM_TARGET:
        return target
    try:
        return parse_target(target).shown
    except FetchError:
        return "(invalid URL)"


def as_time(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
