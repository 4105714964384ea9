"""Celery's consumer, keeping what it cannot hand to a task: every such message becomes a dead letter.

Celery logs and drops a message that names no task, names one this worker does not have, or cannot be decoded
(a pickle refused by the JSON-only accept list). A platform would never hear of it. Here each one is written to
the ledger's dead letters with a stable code (`item deadletters` lists them) and only then acknowledged; while
the ledger is unreachable the message is left unacknowledged, so the broker keeps it.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer
from kombu.exceptions import ContentDisallowed

log = logging.getLogger("item.intake")


class IntakeConsumer(Consumer):
    def on_unknown_message(self, body, message) -> None:
        self._dead_letter(message, "message.unknown_task", "The message names no task (not a Celery message).")

    def on_unknown_task(self, body, message, exc) -> None:
        task = (message.headers or {}).get("task")
        if task is None and isinstance(body, dict):  # protocol 1
            task = body.get("task")
        self._dead_letter(message, "message.unknown_task", f"Task {task!r} is not item.check.", task)

    def on_invalid_task(self, body, message, exc) -> None:
        if isinstance(exc, ContentDisallowed):
            reason = f"Content type {message.content_type!r} is refused: only JSON is read."
            self._dead_letter(message, "message.not_json", reason)
        else:
            self._dead_letter(message, "message.undecodable", f"The message cannot be decoded: {exc}")

    def on_decode_error(self, message, exc) -> None:
        if isinstance(exc, ContentDisallowed):
            reason = f"Content type {message.content_type!r} is refused: only JSON is read."
            self._dead_letter(message, "message.not_json", reason)
        else:
            self._dead_letter(message, "message.undecodable", f"The message cannot be decoded: {exc}")

    def _dead_letter(self, message, code: str, reason: str, task=None) -> None:
        from worker.intake.filing import dead_letter

        headers = message.headers or {}
        letter = dead_letter(
            code, reason, message.body, (message.delivery_info or {}).get("routing_key"),
            task or headers.get("task"), message.content_type,
        )  # fmt: skip
        try:
            self._intake().file([], [letter])
        except Exception:
            log.warning("could not keep a dead letter (%s); the message stays with the broker", code, exc_info=True)
            return
        message.ack()

    def _intake(self):
        if getattr(self, "_item_intake", None) is None:
            from worker.intake.filing import Intake
            from worker.ledger.store import Ledger

            settings = self.app.item_settings
            self._item_intake = Intake(settings, Ledger(settings.database_url))
        return self._item_intake
