"""What a stored batch reports: outcomes written in its transaction (counted and logged once it committed), and
each check's result as the ledger keeps it (an earlier check's, or a detection's)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from worker.ledger.models import CheckRow
from worker.ops import metrics

log = logging.getLogger("item.worker")


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
                log.info("check done: %s %.3f", check.verdict, check.p_fake, extra=extra)
            elif status == "rejected":
                log.info("check rejected: %s", text, extra=extra)
            else:
                log.warning("check failed: %s", text, extra=extra)


RESULT_FIELDS = (
    "image_sha256", "p_fake", "verdict", "verdict_reason", "threshold", "threshold_low", "caption", "objects",
    "object_count", "attribution", "provenance",
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
