"""Structured logs: one JSON object per line, carrying the check id, external id and stage when known."""

from __future__ import annotations

import json
import logging
import sys
import time
from datetime import UTC, datetime

CONTEXT_FIELDS = ("check_id", "external_id", "stage", "code")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        line.update({key: getattr(record, key) for key in CONTEXT_FIELDS if hasattr(record, key)})
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(log_format: str, level: str = "INFO") -> None:
    """Routes every logger to stderr in the chosen format: ours (`item.*`) at `level`, libraries' from warnings
    up (model loaders and migrations narrate at INFO)."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.WARNING, logging.getLevelName(level)))
    logging.getLogger("item").setLevel(level)


class OutageLog:
    """The first failure of a run of failures with its traceback, then one line a minute, until `recovered`:
    an outage of the ledger is one story in the log, not a flood."""

    EVERY_S = 60.0

    def __init__(self, logger: logging.Logger, first: str, still: str):
        self.logger, self.first, self.still = logger, first, still
        self._logged_at: float | None = None

    def failed(self) -> None:
        """Call from an `except` block: the first failure is logged with its traceback."""
        now = time.monotonic()
        if self._logged_at is None:
            self.logger.exception(self.first)
            self._logged_at = now
        elif now - self._logged_at >= self.EVERY_S:
            self.logger.warning(self.still, exc_info=True)
            self._logged_at = now

    def recovered(self) -> None:
        self._logged_at = None
