"""The broker side of the intake: `item.check` messages of any client, filed in the ledger, then acknowledged.

It prefetches many messages, files them in batches (one transaction for up to `intake_batch_size`, or whatever
arrived when the queue goes quiet), and acknowledges each only after its row is committed; it never runs a
model, so it keeps up with any arrival rate and a message waits in the broker for milliseconds, not for the GPU
backlog. While the ledger is down it holds the messages it took and tries again, unacknowledged: they are still
the broker's, redelivered if this process dies. A message that is not JSON (a pickle) is never decoded: it
becomes a dead letter, like one without a usable external id.

Redis and RabbitMQ (or any broker kombu speaks) are read the same way; the connection is re-established after a
broker restart, and a redelivered message finds its row already filed.
"""

from __future__ import annotations

import logging
import threading
import time

from kombu import Connection, Exchange, Queue
from kombu.mixins import ConsumerMixin

from pipeline.core.errors import ItemError
from worker.intake import Intake, dead_letter, from_message
from worker.ledger.models import DeadLetterRow
from worker.service import INFRASTRUCTURE_ERRORS
from worker.settings import CHECK_QUEUE, Settings

log = logging.getLogger("item.intake")

IDLE_FLUSH_S = 0.02  # a quiet queue for this long files what arrived: a lone message waits no longer
HOLD_BACKOFF_S = (0.5, 10.0)  # while the ledger is down: first and longest wait between attempts


def check_queue() -> Queue:
    """`item.checks` as Celery declares it by default (a durable direct exchange of the same name), so a
    platform's Celery client and this consumer agree on RabbitMQ."""
    return Queue(CHECK_QUEUE, Exchange(CHECK_QUEUE, type="direct"), routing_key=CHECK_QUEUE, durable=True)


def broker_connection(settings: Settings) -> Connection:
    options = {"visibility_timeout": settings.visibility_timeout_s}
    if settings.redis_key_prefix:
        options["global_keyprefix"] = settings.redis_key_prefix
    return Connection(settings.broker_url, transport_options=options, heartbeat=0, connect_timeout=5)


class IntakeConsumer(ConsumerMixin):
    """Run on a thread of `item worker` (`run()` returns once `stop()` was called)."""

    def __init__(self, settings: Settings, intake: Intake):
        self.settings = settings
        self.intake = intake
        self.connection = broker_connection(settings)
        self.pending: list = []  # (submission or dead letter, message), in arrival order
        self.ready = threading.Event()  # set once consuming
        self._last_arrival = 0.0

    def get_consumers(self, consumer_class, channel):
        consumer = consumer_class(
            queues=[check_queue()],
            callbacks=[self._received],
            accept=["json"],
            prefetch_count=self.settings.intake_prefetch,
        )
        return [consumer]

    def on_consume_ready(self, connection, channel, consumers, **kwargs) -> None:
        self.ready.set()
        log.info("intake consuming %s", CHECK_QUEUE)

    def on_consume_end(self, connection, channel) -> None:
        # Stopping: what arrived is filed and acknowledged now rather than redelivered later.
        if self.pending:
            try:
                self.flush()
            except Exception:
                log.warning("could not file the last messages; the broker delivers them again", exc_info=True)

    def on_connection_error(self, exc, interval) -> None:
        self.ready.clear()
        log.warning("broker unreachable (%s); trying again in %.0fs", exc, interval)

    def on_decode_error(self, message, exc) -> None:
        # Not JSON (a pickle, say) or not decodable: never deserialised, kept as a dead letter, acknowledged.
        letter = dead_letter(
            "message.not_json" if "disallowed" in type(exc).__name__.lower() else "message.undecodable",
            f"The message body was refused: {exc}",
            message.body,
            (message.delivery_info or {}).get("routing_key"),
            (message.headers or {}).get("task"),
            message.content_type,
        )
        log.warning("message refused: %s (content type %s)", exc, message.content_type)
        self.pending.append((letter, message))
        self._last_arrival = time.monotonic()

    def _received(self, body, message) -> None:
        self.pending.append((from_message(body, message.headers, message.delivery_info, message.body), message))
        self._last_arrival = time.monotonic()

    def on_iteration(self) -> None:
        """Called between deliveries: files what is pending when enough arrived or the queue went quiet."""
        full = len(self.pending) >= self.settings.intake_batch_size
        quiet = time.monotonic() - self._last_arrival >= IDLE_FLUSH_S
        if self.pending and (full or quiet):
            self.flush()

    def flush(self) -> None:
        batch, self.pending = self.pending, []
        submissions = [item for item, _ in batch if not isinstance(item, DeadLetterRow)]
        dead = [item for item, _ in batch if isinstance(item, DeadLetterRow)]
        if not self._file(submissions, dead):
            return  # stopping with the ledger down: unacknowledged, the broker delivers them again
        for _, message in batch:
            message.ack()

    def _file(self, submissions, dead) -> bool:
        """Files them, holding on while the ledger is unreachable; False if told to stop meanwhile."""
        wait = HOLD_BACKOFF_S[0]
        while True:
            try:
                self.intake.file(submissions, dead)
                return True
            except (*INFRASTRUCTURE_ERRORS, ItemError) as error:
                if isinstance(error, ItemError) and error.code != "version.none":
                    raise
                log.warning("cannot file %d messages yet (%s); holding them", len(submissions) + len(dead), error)
            if self.should_stop:
                return False
            time.sleep(wait)
            wait = min(HOLD_BACKOFF_S[1], wait * 2)

    def run(self, **kwargs) -> None:
        super().run(safety_interval=IDLE_FLUSH_S, **kwargs)

    def stop(self) -> None:
        self.should_stop = True
