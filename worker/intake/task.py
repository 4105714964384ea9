"""The `item.check` task: messages filed in the ledger in batches, each acknowledged once its row is committed.

    broker ─▶ Celery consumer ─▶ buffer (celery-batches) ─▶ a pool thread: Intake.file(batch), one transaction
          ◀── ack each message ◀── committed; or, when the worker stops before the ledger came back, requeue

The task body is the intake and nothing else: validate, keep inline bytes as a blob, file the row. No model runs
here, so a message waits in the broker for milliseconds whatever the GPU backlog. A batch is what arrived within
`FLUSH_EVERY_S`, at most `intake_batch_size` messages.

A message is filed for the tenant whose queue it arrived on (`worker.intake.queues`), never one its body or headers
name; a batch is filed one transaction per tenant. A message on the queue of a tenant that does not exist, or is
disabled, becomes a dead letter (`tenant.unknown`, `tenant.disabled`).

Decoding never raises: a message that is not a well-formed `item.check` becomes a `rejected` row (a usable
external id) or a dead letter, and is acknowledged like any other. While the ledger is unreachable the batch is
held and tried again, unacknowledged: the messages stay the broker's, and come back if this worker dies.

Flower and `celery events` see each message once it is filed: `task-succeeded` with its check id and status, or
`task-failed` for a dead letter, each carrying its external id and the kind of its image (never the image) and
when it arrived.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from celery_batches import Batches
from kombu.exceptions import ContentDisallowed

from pipeline.core.errors import ItemError
from worker.intake.queues import ArrivalQueues, tenant_of_queue
from worker.ledger.models import DEFAULT_TENANT
from worker.settings import CHECK_TASK, Settings

log = logging.getLogger("item.intake")

FLUSH_EVERY_S = 0.02  # a quiet queue for this long files what arrived: a lone message waits no longer
HOLD_BACKOFF_S = (0.5, 10.0)  # while the ledger is down: first and longest wait between attempts
MESSAGE_MARGIN_BYTES = 64 * 1024  # a message's JSON around the base64 of the largest inline image
SHOWN_ID_CHARS = 64  # of an external id, in an event: enough to find it, not a way to fill a monitor


@dataclass(frozen=True)
class Taken:
    """A message in the buffer, with Celery's promises to acknowledge or give it back (no Celery `Request`:
    at thousands of messages a second building one each is most of the consumer's time)."""

    message: Any
    ack: Any
    reject: Any
    queue: str | None = None  # the queue it was delivered from: its tenant's
    eta = None  # celery-batches' flush asks; item.check never has one

    @property
    def task_id(self) -> str | None:
        payload = self.message.payload if not self.message.headers else None
        return (self.message.headers or {}).get("id") or (payload.get("id") if isinstance(payload, dict) else None)


class CheckIntake(Batches):
    """`item.check`, run as batches: the buffer and its flush timer are celery-batches'; what goes in the buffer
    and `flush` are ours."""

    abstract = True
    settings: Settings
    stopping = threading.Event()  # set when the worker shuts down: a held batch is given back, not kept
    _making_intake = threading.Lock()

    def run(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"{CHECK_TASK} runs on a worker, in batches; send it through the broker")

    def Strategy(self, task, app, consumer):  # noqa: N802  (celery's name; called at every (re)connection)
        self._consumer, self._pool = consumer, consumer.pool
        threading.Thread(target=self._warm_up, name="item-intake-warm-up", daemon=True).start()  # never blocks
        # A reconnection clears the event loop's timers, celery-batches' flush timer with them, while it still
        # thinks one runs: without this, what arrives after a broker restart would wait for a full batch.
        self._tref = None
        if not self._buffer.empty():  # taken before the connection dropped: filed now (the ack may not land)
            self._start_timer()
        put, every, arrivals = self._buffer.put, self.flush_every, ArrivalQueues()

        def on_message(message, body, ack, reject, callbacks, **_) -> None:
            put(Taken(message, ack, reject, arrivals.of(message, consumer.task_consumer)))
            if self._tref is None:
                self._start_timer()
            if not next(self._count) % every:  # celery-batches replaces its counter at each flush
                self._do_flush()

        return on_message

    def _start_timer(self) -> None:
        self._tref = self._consumer.timer.call_repeatedly(self.flush_interval, self._do_flush)

    def _warm_up(self) -> None:
        """Imports the intake and opens a ledger connection now, so the first message is filed as fast as any."""
        try:
            with self.intake().ledger.engine.connect():
                pass
        except Exception:  # the ledger is down: the first batch will hold on until it is back
            log.warning("the ledger is unreachable at start; messages wait for it", exc_info=True)

    def flush(self, requests) -> Any:
        """Decodes each request (never raising), then files them all on a pool thread; acks on return."""
        limit = self.settings.max_b64_bytes * 4 // 3 + MESSAGE_MARGIN_BYTES
        items = [_item_of(request, limit) for request in requests]
        tenants = [tenant_of_queue(request.queue) for request in requests]
        received, started = time.time(), time.monotonic()

        consumer = self._consumer

        def on_return(filed) -> None:
            runtime = time.monotonic() - started
            consumer.call_soon(_acknowledge, consumer, requests, items, filed, received, runtime)

        return self._pool.apply_async(self._file, (items, tenants), callback=on_return)

    def _file(self, items: list, tenants: list[str | None]) -> list | None:
        """The filed checks (None in the place of a dead letter), or None when stopping with the ledger down."""
        try:
            return file_by_tenant(self.intake(), items, tenants, self.stopping)
        except Exception:  # a bug: nothing is acknowledged, and the broker gives the messages back later
            log.exception("filing %d messages crashed; they stay unacknowledged", len(items))
            return None

    def intake(self):
        """This worker's one intake (and ledger pool), shared by the batches and the consumer's dead letters."""
        with self._making_intake:  # the warm-up thread and the first batch may both ask
            if getattr(self, "_intake_instance", None) is None:
                from worker.intake.filing import Intake
                from worker.ledger.store import Ledger

                self._intake_instance = Intake(self.settings, Ledger(self.settings.database_url))
            return self._intake_instance


def register_check_task(app, settings: Settings) -> None:
    app.task(
        name=CHECK_TASK,
        base=CheckIntake,
        acks_late=True,
        ignore_result=True,
        flush_every=settings.intake_batch_size,
        flush_interval=FLUSH_EVERY_S,
        settings=settings,
    )(_contract)


def _contract(external_id: str, image: dict, callback_url: str | None = None) -> None:
    """item.check(external_id, image, callback_url=None): the documented contract; the worker files it."""


def file_by_tenant(intake, items: list, tenants: list[str | None], stopping: threading.Event) -> list | None:
    """`file_holding` for each tenant's part of `items` (`tenants[i]` is the tenant whose queue `items[i]` came
    from; None: a queue that is no tenant's), one transaction each; the outcomes in the order of `items` (which
    this changes in place, as `file_holding` does), or None if told to stop meanwhile."""
    parts: dict[str | None, list[int]] = {}
    for index, tenant_id in enumerate(tenants):
        parts.setdefault(tenant_id, []).append(index)
    outcomes: list = [None] * len(items)
    for tenant_id, indexes in parts.items():
        part = [items[index] for index in indexes]
        filed = file_holding(intake, part, stopping, tenant_id)
        if filed is None:
            return None  # what was filed already is filed again, the same, when the messages come back
        for index, item, outcome in zip(indexes, part, filed, strict=True):
            items[index], outcomes[index] = item, outcome
    return outcomes


TENANT_REFUSALS = ("tenant.unknown", "tenant.disabled")


def file_holding(intake, items: list, stopping: threading.Event, tenant_id: str | None = DEFAULT_TENANT) -> list | None:
    """Files `items` (requests and dead letters) in one transaction, holding on while the ledger is unreachable
    (or no version is registered yet); returns what each became (None for a dead letter), or None if told to
    stop meanwhile (the caller then gives the messages back).

    They are `tenant_id`'s (None: no tenant's; see `file_by_tenant`). A tenant that does not exist or is disabled
    files nothing: every item becomes a dead letter saying so.

    A transaction that fails for any other reason (a message no check foresaw, a bug) must not hold the batch
    forever, nor fail it whole: its items are filed one at a time, and the one that fails again becomes a dead
    letter `message.internal_error` in `items` (which this changes in place), so the rest are filed as usual.
    """
    try:
        if tenant_id is None:
            raise TenantQueueError(f"The queue of these {len(items)} messages is no tenant's.")
        return _holding(lambda: _file_together(intake, items, tenant_id), len(items), stopping)
    except ItemError as error:
        if error.code not in TENANT_REFUSALS:
            return _one_at_a_time(intake, items, stopping, tenant_id, error)
        letters = [_refused_letter(item, error, tenant_id) for item in items]
        filed = _holding(lambda: _file_together(intake, letters, None), len(items), stopping)
        items[:] = letters
        return filed
    except Exception as error:
        return _one_at_a_time(intake, items, stopping, tenant_id, error)


class TenantQueueError(ItemError):
    """Messages that came on a queue of no tenant. Permanent: each becomes a dead letter."""

    code = "tenant.unknown"


def _refused_letter(item, error: ItemError, tenant_id: str | None):
    """The dead letter of a message its tenant cannot file: a disabled tenant's keeps its tenant, an unknown
    tenant's none (an id that is no tenant's names no one)."""
    letter = item if _is_dead_letter(item) else _asked_letter(item, error.code, error.message)
    letter.tenant_id = tenant_id if error.code == "tenant.disabled" else None
    return letter


def _one_at_a_time(intake, items: list, stopping: threading.Event, tenant_id: str, error: Exception) -> list | None:
    if len(items) == 1 and _is_dead_letter(items[0]):
        raise error  # a dead letter alone that cannot be filed: see _file_one
    log.error("filing a batch of %d messages failed; filing them one at a time", len(items), exc_info=error)
    outcomes = []
    for index in range(len(items)):
        one = _file_one(intake, items, index, stopping, tenant_id)
        if one is _STOPPED:
            return None
        outcomes.append(one)
    return outcomes


_STOPPED = object()


def _file_one(intake, items: list, index: int, stopping: threading.Event, tenant_id: str):
    """Files `items[index]` alone; if that fails too, files a dead letter in its place (a bare one, without the
    body, if even that fails: the message is then acknowledged with only a log line to show for it)."""
    try:
        filed = _holding(lambda: _file_together(intake, [items[index]], tenant_id), 1, stopping)
        return _STOPPED if filed is None else filed[0]
    except Exception as error:
        log.exception("a message of the batch cannot be filed; it becomes a dead letter")
        letter = _internal_error_letter(items[index], error)
    for attempt in (letter, bare_letter(letter)):
        try:
            if _holding(lambda one=attempt: _file_together(intake, [one], tenant_id), 1, stopping) is None:
                return _STOPPED
            items[index] = attempt
            return None
        except Exception:
            log.exception("the dead letter of a message cannot be filed either")
    log.critical("a message was dropped: neither it nor its dead letter could be filed (%s)", letter.reason)
    items[index] = letter
    return None


def _holding(file, count: int, stopping: threading.Event) -> list | None:
    """`file()`, tried again while the ledger is unreachable or no version is registered; None if told to stop."""
    from worker.ledger.engine import INFRASTRUCTURE_ERRORS

    wait = HOLD_BACKOFF_S[0]
    while True:
        try:
            return file()
        except (*INFRASTRUCTURE_ERRORS, ItemError) as error:
            if isinstance(error, ItemError) and error.code != "version.none":
                raise
            log.warning("cannot file %d messages yet (%s); holding them", count, error)
        if stopping.wait(wait):
            return None
        wait = min(HOLD_BACKOFF_S[1], wait * 2)


def _file_together(intake, items: list, tenant_id: str | None) -> list:
    """One transaction; `tenant_id` None: dead letters only, of no tenant."""
    requests = [item for item in items if not _is_dead_letter(item)]
    dead = [item for item in items if _is_dead_letter(item)]
    for letter in dead:
        letter.tenant_id = letter.tenant_id or tenant_id
    filed = iter(intake.file(requests, dead, conflicts_dead=True, tenant_id=tenant_id or DEFAULT_TENANT))
    return [None if _is_dead_letter(item) else next(filed) for item in items]


def _is_dead_letter(item) -> bool:
    from worker.ledger.models import DeadLetterRow

    return isinstance(item, DeadLetterRow)


def _internal_error_letter(item, error: Exception):
    """The dead letter of a message whose filing failed for a reason no check foresaw: what it asked for, and why."""
    from worker.intake.filing import dead_letter

    if _is_dead_letter(item):
        letter = dead_letter(item.code, item.reason, item.body, item.queue, item.task, item.content_type)
        letter.tenant_id = item.tenant_id
        return letter
    return _asked_letter(item, "message.internal_error", f"Filing this message failed: {type(error).__name__}: {error}")


def _asked_letter(item, code: str, reason: str):
    """A dead letter keeping what a check request asked for."""
    from worker.intake.filing import dead_letter

    asked = {"external_id": item.external_id, "image": item.image, "callback_url": item.callback_url}
    return dead_letter(code, reason, asked, None, CHECK_TASK)


def bare_letter(letter):
    from worker.intake.filing import dead_letter

    bare = dead_letter(letter.code, letter.reason[:200], "<body not kept: it could not be stored>", None)
    bare.tenant_id = letter.tenant_id
    return bare


def _item_of(taken, max_bytes: int):
    """What a message asks for: a check request, or a dead letter saying why it cannot be one. Its body is
    decoded here, by kombu under the JSON-only accept list: a pickle is refused unread, and so is a body larger
    than any check (`max_bytes`)."""
    from worker.intake.filing import from_message

    message = taken.message
    size = len(message.body or b"")
    if size > max_bytes:
        reason = f"The message is {size:,} bytes; no check is larger than {max_bytes:,} (ITEM_MAX_B64_BYTES)."
        return message_letter(message, "message.too_large", reason)
    try:
        return from_message(message.payload, message.headers, message.delivery_info, message.body)
    except Exception as error:  # a body no reader foresaw: kept, never a crash of the whole batch
        return unreadable_letter(message, error)


def unreadable_letter(message, error: Exception):
    """The dead letter of a message kombu would not decode: a refused content type, or a body no reader foresaw
    (bytes the Redis take found in the queue that were no message at all arrive wrapped, saying why)."""
    unreadable = (getattr(message, "headers", None) or {}).get("item_unreadable")
    if unreadable:
        return message_letter(message, "message.undecodable", f"The message cannot be read: {unreadable}")
    if isinstance(error, ContentDisallowed):
        reason = f"Content type {message.content_type!r} is refused: only JSON is read."
        return message_letter(message, "message.not_json", reason)
    return message_letter(message, "message.undecodable", f"The message cannot be decoded: {error!r}")


def message_letter(message, code: str, reason: str, task=None):
    """A dead letter keeping what a kombu message carried: its body, queue, task and content type."""
    from worker.intake.filing import dead_letter

    task = task or (getattr(message, "headers", None) or {}).get("task")
    queue = (getattr(message, "delivery_info", None) or {}).get("routing_key")
    return dead_letter(code, reason, message.body, queue, task, message.content_type)


def _shown(item) -> str:
    """An item as an event shows it: its external id (cut) and its image's kind, never the image itself."""
    external_id = getattr(item, "external_id", None)
    if external_id is None:
        return "{}"
    image = getattr(item, "image", None)
    kinds = sorted(image) if isinstance(image, dict) else [type(image).__name__]
    return repr({"external_id": external_id[:SHOWN_ID_CHARS], "image": kinds[:4]})


def _acknowledge(consumer, taken: list[Taken], items, filed, received: float, runtime: float) -> None:
    """On the consumer's thread: ack what was filed (and tell the monitors), or give it all back.

    One event per message, carrying what `task-received` would have (name, arguments as shown, arrival): at
    thousands of messages a second, a second event each is a cost the intake rate feels, and monitors build a
    task's record from whichever of its events they see."""
    errors = consumer.connection_errors
    if filed is None:
        for one in taken:
            one.reject(log, errors, True)
        return
    eventer = consumer.event_dispatcher
    send = eventer.send if eventer is not None and eventer.enabled else None
    for one, item, outcome in zip(taken, items, filed, strict=True):
        one.ack(log, errors)
        if send is None:
            continue
        shown = {"name": CHECK_TASK, "args": "[]", "kwargs": _shown(item), "received": received, "runtime": runtime}
        if outcome is None or outcome.conflict is not None:
            why = outcome.conflict if outcome is not None else item
            send("task-failed", uuid=one.task_id, exception=f"{why.code}: {getattr(why, 'reason', why)}",
                 traceback="", **shown)  # fmt: skip
        else:
            status = getattr(outcome.check.status, "value", outcome.check.status)
            result = {"check_id": outcome.check.id, "status": status, "created": outcome.created}
            send("task-succeeded", uuid=one.task_id, result=json.dumps(result), **shown)
