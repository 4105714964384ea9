"""The broker side of the intake: `item.check` messages of any client, filed in the ledger, then acknowledged.

Both readers below take many messages at once, file them in batches (one transaction for up to
`intake_batch_size`, or whatever arrived when the queue goes quiet), and acknowledge each only after its row is
committed; they never run a model, so they keep up with any arrival rate and a message waits in the broker for
milliseconds, not for the GPU backlog. While the ledger is down they hold the messages they took and try again,
unacknowledged: the messages are still the broker's, and come back if this process dies. A message that is not
JSON (a pickle) is never decoded: it becomes a dead letter, like one without a usable external id.

- Redis (`RedisIntake`): each message is moved atomically from the list `item.checks` into a list of this
  intake's own (`BLMOVE`), and removed from there once filed. An intake killed with messages in its list stops
  renewing a key that says it is alive; any other intake then moves them back to `item.checks`. (kombu's own
  Redis consumer pops a message before it records holding it, so a kill in between would lose it.)
- RabbitMQ, or any broker kombu speaks (`AmqpIntake`): a consumer with prefetch and manual acknowledgement; the
  broker itself gives back what a closed connection held unacknowledged.

Either reconnects after a broker restart; a message delivered twice finds its row already filed.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

from kombu import Connection, Exchange, Queue
from kombu.mixins import ConsumerMixin

from pipeline.core.errors import ItemError
from worker.gpu.batches import INFRASTRUCTURE_ERRORS
from worker.intake.filing import CheckRequest, Intake, dead_letter, from_message
from worker.ledger.models import DeadLetterRow
from worker.settings import CHECK_QUEUE, Settings

log = logging.getLogger("item.intake")

IDLE_FLUSH_S = 0.02  # a quiet queue for this long files what arrived: a lone message waits no longer
HOLD_BACKOFF_S = (0.5, 10.0)  # while the ledger is down: first and longest wait between attempts
ALIVE_S = 15.0  # a Redis intake that has not said it is alive for this long has died: its messages go back
RECOVER_EVERY_S = 5.0

Item = CheckRequest | DeadLetterRow


def make_intake(settings: Settings, intake: Intake):
    """The reader for the configured broker."""
    if settings.broker_url.startswith(("redis://", "rediss://", "unix://")):
        return RedisIntake(settings, intake)
    return AmqpIntake(settings, intake)


def file_holding(intake: Intake, items: list[Item], stopping: threading.Event, keep_alive=lambda: None) -> bool:
    """Files `items` in one transaction, holding on while the ledger is unreachable (or no version is registered
    yet), calling `keep_alive` between attempts; False if told to stop meanwhile (the caller then leaves the
    messages unacknowledged)."""
    submissions = [item for item in items if not isinstance(item, DeadLetterRow)]
    dead = [item for item in items if isinstance(item, DeadLetterRow)]
    wait = HOLD_BACKOFF_S[0]
    while True:
        try:
            intake.file(submissions, dead)
            return True
        except (*INFRASTRUCTURE_ERRORS, ItemError) as error:
            if isinstance(error, ItemError) and error.code != "version.none":
                raise
            log.warning("cannot file %d messages yet (%s); holding them", len(items), error)
        if stopping.wait(wait):
            return False
        keep_alive()
        wait = min(HOLD_BACKOFF_S[1], wait * 2)


# ---------------------------------------------------------------------- Redis


def from_envelope(raw: bytes | str) -> Item:
    """A message as Celery clients put it on a Redis list (kombu's JSON envelope) → what it asks for."""
    try:
        envelope = json.loads(raw)
        body = envelope["body"]
        properties = envelope.get("properties") or {}
        content_type = envelope.get("content-type")
        if content_type != "application/json":
            return dead_letter(
                "message.not_json", f"Content type {content_type!r} is refused: only JSON is read.", raw, CHECK_QUEUE,
                (envelope.get("headers") or {}).get("task"), content_type,
            )  # fmt: skip
        if properties.get("body_encoding") == "base64":
            body = base64.b64decode(body, validate=True)
        decoded = json.loads(body)
    except (ValueError, KeyError, TypeError, binascii.Error) as error:
        return dead_letter("message.undecodable", f"The message cannot be decoded: {error}", raw, CHECK_QUEUE)
    return from_message(decoded, envelope.get("headers"), properties.get("delivery_info"), raw)


class RedisIntake:
    """Run on a thread of `item worker` (`run()` returns once `stop()` was called)."""

    def __init__(self, settings: Settings, intake: Intake):
        import redis

        self.settings = settings
        self.intake = intake
        self.ready = threading.Event()  # set while consuming
        self.stopping = threading.Event()
        prefix = settings.redis_key_prefix
        me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.queue = f"{prefix}{CHECK_QUEUE}"
        self.holding = f"{prefix}{CHECK_QUEUE}.held.{me}"  # this intake's messages, until filed
        self.alive_prefix = f"{prefix}{CHECK_QUEUE}.alive."
        self.alive = f"{self.alive_prefix}{me}"
        self.client = redis.Redis.from_url(settings.broker_url, socket_timeout=10, socket_connect_timeout=5)
        self._errors = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError)
        self._recovered_at = 0.0

    def run(self) -> None:
        wait = 1.0
        while not self.stopping.is_set():
            try:
                self._say_alive()
                if not self.ready.is_set():
                    log.info("intake consuming %s", CHECK_QUEUE)
                    self.ready.set()
                self._recover_the_dead()
                self._take_and_file()
                wait = 1.0
            except self._errors as error:
                self.ready.clear()
                log.warning("broker unreachable (%s); trying again in %.0fs", error, wait)
                self.stopping.wait(wait)
                wait = min(30.0, wait * 2)

    def stop(self) -> None:
        self.stopping.set()

    def _take_and_file(self) -> None:
        """Files what this intake holds (a batch taken before a broker outage), else takes a batch and files it."""
        raws = list(reversed(self.client.lrange(self.holding, 0, -1))) or self._take()  # oldest first
        if raws and file_holding(self.intake, [from_envelope(raw) for raw in raws], self.stopping, self._say_alive):
            self.client.delete(self.holding)  # filed and committed: the acknowledgement

    def _take(self) -> list[bytes]:
        """Up to intake_batch_size messages, oldest first, each moved atomically into this intake's list: waits up
        to a second for the first, then takes what else arrives until the queue is quiet for IDLE_FLUSH_S."""
        first = self.client.blmove(self.queue, self.holding, 1, "RIGHT", "LEFT")
        if first is None:
            return []
        taken = [first]
        quiet_at = time.monotonic() + IDLE_FLUSH_S
        while len(taken) < self.settings.intake_batch_size:
            with self.client.pipeline(transaction=False) as pipe:  # one round trip for the rest of a batch
                for _ in range(self.settings.intake_batch_size - len(taken)):
                    pipe.lmove(self.queue, self.holding, "RIGHT", "LEFT")
                more = [raw for raw in pipe.execute() if raw is not None]
            if more:
                taken += more
                quiet_at = time.monotonic() + IDLE_FLUSH_S
            elif time.monotonic() >= quiet_at:
                break
            else:
                time.sleep(0.002)
        return taken

    def _say_alive(self) -> None:
        self.client.set(self.alive, "1", px=int(ALIVE_S * 1000))

    def _recover_the_dead(self) -> None:
        """Moves the held messages of intakes that stopped saying they are alive back onto the queue."""
        if time.monotonic() - self._recovered_at < RECOVER_EVERY_S:
            return
        self._recovered_at = time.monotonic()
        held_prefix = f"{self.queue}.held."
        for key in self.client.scan_iter(match=f"{held_prefix}*", count=100):
            owner = key.decode()[len(held_prefix) :]
            if self.client.exists(f"{self.alive_prefix}{owner}"):
                continue
            moved = 0
            while self.client.lmove(key, self.queue, "RIGHT", "RIGHT") is not None:
                moved += 1
            if moved:
                log.warning("gave %d messages of a dead intake (%s) back to %s", moved, owner, CHECK_QUEUE)


# ---------------------------------------------------------------------- RabbitMQ (and other kombu transports)


def check_queue() -> Queue:
    """`item.checks` as Celery declares it by default (a durable direct exchange of the same name), so a
    platform's Celery client and this consumer agree on RabbitMQ."""
    return Queue(CHECK_QUEUE, Exchange(CHECK_QUEUE, type="direct"), routing_key=CHECK_QUEUE, durable=True)


def broker_connection(settings: Settings) -> Connection:
    options: dict[str, Any] = {}
    if settings.redis_key_prefix:
        options["global_keyprefix"] = settings.redis_key_prefix
    return Connection(settings.broker_url, transport_options=options, heartbeat=0, connect_timeout=5)


class AmqpIntake(ConsumerMixin):
    """Run on a thread of `item worker` (`run()` returns once `stop()` was called)."""

    def __init__(self, settings: Settings, intake: Intake):
        self.settings = settings
        self.intake = intake
        self.connection = broker_connection(settings)
        self.pending: list = []  # (submission or dead letter, message), in arrival order
        self.ready = threading.Event()  # set while consuming
        self.stopping = threading.Event()
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
        if not file_holding(self.intake, [item for item, _ in batch], self.stopping):
            return  # stopping with the ledger down: unacknowledged, the broker delivers them again
        for _, message in batch:
            message.ack()

    def run(self, **kwargs) -> None:
        super().run(safety_interval=IDLE_FLUSH_S, **kwargs)

    def stop(self) -> None:
        self.should_stop = True
        self.stopping.set()
