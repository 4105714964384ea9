"""What a stored batch reports: outcomes written in its transaction (counted and logged once it committed), and
each check's result as the ledger keeps it (an earlier check's, or a detection's)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.orm import Session

from pipeline.core.errors import ItemError
from worker.intake.text import storable
from worker.ledger import outbox, transitions
from worker.ledger.models import CheckRow, utcnow
from worker.ledger.states import CheckStatus
from worker.ledger.store import Ending, Lease
from worker.ops import metrics
from worker.settings import Settings, backoff_s

log = logging.getLogger("item.worker")

ERROR_MESSAGE_CHARS = 2_000  # of a stored error message


@dataclass
class Outcomes:
    """Outcomes written in one transaction, reported (metrics, logs) only after it committed."""

    version_id: str
    items: list[tuple] = field(default_factory=list)

    def add(self, status: str, check: CheckRow, stage: str, code: str | None = None, text: str = "", **more) -> None:
        self.items.append((status, check, stage, code, text, more))

    def report(self) -> None:
        for status, check, stage, code, text, more in self.items:
            extra = about(check, stage, **({"code": code} if code else {}))
            if status == "retried":
                metrics.RETRIES.labels(code).inc()
                log.info("check retried in %.1fs: %s", more["delay"], text, extra=extra)
                continue
            metrics.finished(status, code, check.created_at, check.tenant_id)
            if status == "done":
                metrics.scored(self.version_id, check.p_fake, check.verdict)
                metrics.provenance(check.provenance)
                metrics.likeness(check)
                log.info("check done: %s %.3f", check.verdict, check.p_fake, extra=extra)
            elif status == "rejected":
                log.info("check rejected: %s", text, extra=extra)
            else:
                log.warning("check failed: %s", text, extra=extra)


RESULT_FIELDS = (
    "image_sha256", "p_fake", "verdict", "verdict_reason", "threshold", "threshold_low", "caption", "objects",
    "object_count", "attribution", "provenance", "media", "reused_from", "match",
)  # fmt: skip


def result_of(done: CheckRow) -> dict:
    return {field: getattr(done, field) for field in RESULT_FIELDS}


def result_of_detection(d, sha256: str) -> dict:
    as_dict = d.to_dict()
    return {
        "image_sha256": sha256,
        "p_fake": d.p_fake,
        "verdict": d.verdict,
        "verdict_reason": d.verdict_reason,
        "threshold": d.threshold,
        "threshold_low": d.threshold_low,
        "caption": d.caption,
        "objects": as_dict["objects"],
        "object_count": d.object_count,
        "attribution": d.attribution,
        "provenance": as_dict["provenance"],
        "timings_ms": as_dict["timings_ms"],
    }


def about(check: CheckRow, stage: str, **fields) -> dict:
    """The `extra` of every log line about a check: which check, for which upload, at which stage."""
    return {"check_id": check.id, "external_id": check.external_id, "stage": stage, **fields}


Failure = tuple[CheckRow, ItemError, str]  # a check, why it failed, and at which stage


def end_checks(
    session: Session, settings: Settings, lease: Lease, errors: list[Failure], outcomes: Outcomes
) -> list[CheckRow]:
    """Each check ends for its error: rejected if the error is permanent; else retried with backoff and jitter, or
    failed once attempts are used up. One statement per kind of ending, whatever their number. Returns the checks
    that ended (not those retried); checks this lease no longer holds are left alone."""
    if not errors:
        return []
    endings = {check.id: ending_of(check, error, settings) for check, error, _ in errors}
    why = {check.id: (error, stage) for check, error, stage in errors}
    ended = []
    for row in transitions.end_many(session, lease.token, endings):
        (error, stage), ending = why[row.id], endings[row.id]
        if ending.status == CheckStatus.queued:
            delay = max(0.0, (ending.available_at - utcnow()).total_seconds())
            outcomes.add("retried", row, stage, error.code, error.message, delay=delay)
        else:
            outcomes.add(ending.status.value, row, stage, error.code, error.message)
            ended.append(row)
    return ended


def ending_of(check: CheckRow, error: ItemError, settings: Settings) -> Ending:
    message = storable(error.message, ERROR_MESSAGE_CHARS)  # may quote a server's answer: NUL, anything
    if error.permanent:
        return Ending(CheckStatus.rejected, error.code, message)
    if check.attempts >= settings.max_attempts:
        return Ending(CheckStatus.failed, error.code, message)
    delay = backoff_s(check.attempts, settings.retry_backoff_s, settings.retry_backoff_max_s)
    return Ending(CheckStatus.queued, error.code, message, utcnow() + timedelta(seconds=delay))


def queue_deliveries(session: Session, finished: list[CheckRow], settings: Settings) -> None:
    """Finished checks' results are queued for delivery in the transaction that finishes them, so a stored outcome
    always has its deliveries."""
    outbox.record_outcomes(session, finished, results_stream=bool(settings.results_stream))
