"""Celery's consumer, keeping what it cannot hand to a task: every such message becomes a dead letter.

Celery logs and drops a message that names no task, names one this worker does not have, or cannot be decoded
(a pickle refused by the JSON-only accept list). A platform would never hear of it. Here each one is written to
the ledger's dead letters with a stable code (`item deadletters` lists them) and only then acknowledged; while
the ledger is unreachable the message is left unacknowledged, so the broker keeps it. A dead letter belongs to the
tenant whose queue the message came on.
"""

from __future__ import annotations

import logging

from celery.worker.consumer import Consumer

from worker.intake.queues import ArrivalQueues, tenant_of_queue
from worker.intake.task import bare_letter, message_letter, unreadable_letter
from worker.settings import CHECK_TASK

log = logging.getLogger("item.intake")


class IntakeConsumer(Consumer):
    def stop(self) -> None:
        """A warm shutdown stops the intake first (before the GPU loops drain): nothing more is taken, and a message
        taken but not yet filed was never acknowledged, so the broker keeps it for another worker."""
        log.info("stopping intake: taking no more messages; any not yet filed stay with the broker, unacknowledged")
        super().stop()
        log.info("intake stopped")

    def on_unknown_message(self, body, message) -> None:
        reason = "The message names no task (not a Celery message)."
        self._keep(message_letter(message, "message.unknown_task", reason), message)

    def on_unknown_task(self, body, message, exc) -> None:
        task = (message.headers or {}).get("task")
        if task is None and isinstance(body, dict):  # protocol 1
            task = body.get("task")
        self._keep(message_letter(message, "message.unknown_task", f"Task {task!r} is not item.check.", task), message)

    def on_invalid_task(self, body, message, exc) -> None:
        self._keep(unreadable_letter(message, exc), message)

    def on_decode_error(self, message, exc) -> None:
        self._keep(unreadable_letter(message, exc), message)

    def _keep(self, letter, message) -> None:
        """Writes the dead letter through the task's own intake (one ledger pool per worker), then acks. While
        the ledger is unreachable the message stays with the broker; a letter the ledger refuses for any other
        reason is kept without its body, or, failing that, dropped with a critical log line: never a message
        that comes back to fail again for ever."""
        from worker.ledger.engine import INFRASTRUCTURE_ERRORS

        if not hasattr(self, "_arrivals"):
            self._arrivals = ArrivalQueues()
        letter.tenant_id = tenant_of_queue(self._arrivals.of(message, self.task_consumer))  # its queue's tenant
        intake = self.app.tasks[CHECK_TASK].intake()
        for attempt in (letter, bare_letter(letter)):
            try:
                intake.file([], [attempt])
                break
            except INFRASTRUCTURE_ERRORS:
                log.warning("could not keep a dead letter (%s); the message stays with the broker", letter.code,
                            exc_info=True)  # fmt: skip
                return
            except Exception:
                log.exception("the ledger refused a dead letter (%s)", letter.code)
        else:
            log.critical("a message was dropped: its dead letter could not be stored (%s)", letter.reason)
        message.ack()
