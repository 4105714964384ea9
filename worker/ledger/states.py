"""The states a check and a delivery go through, and the claim order: plain values, no database library.

The command line reads them to offer choices (`item deliveries list --status`) without loading SQLAlchemy.
"""

from __future__ import annotations

from enum import StrEnum


class Priority:
    """Claim order: lower first. Fresh uploads always go before re-scores of what was already checked."""

    fresh = 0
    rescore = 1


class CheckStatus(StrEnum):
    queued = "queued"
    running = "running"
    done = "done"
    rejected = "rejected"
    failed = "failed"


TERMINAL_STATUSES = frozenset({CheckStatus.done, CheckStatus.rejected, CheckStatus.failed})


class DeliveryStatus(StrEnum):
    pending = "pending"
    delivered = "delivered"
    failed = "failed"  # attempts used up, or a target that can never work; the last error is kept


STREAM_TARGET = "stream"  # the `target` of a results-stream delivery; any other target is a callback URL
