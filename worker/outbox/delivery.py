"""Pushing results back to platforms: signed callbacks and a results stream, sent from the ledger's outbox.

When a check ends (done, rejected or failed), `worker.ledger.outbox.record_outcome` writes one `deliveries`
row per target in the same transaction: the check's callback URL, if it has one, and "stream" if
`ITEM_RESULTS_STREAM` is set. A `Deliverer` thread in every worker process claims due rows with a lease (SKIP
LOCKED on Postgres, like checks), sends them, and records the outcome. Sending never happens on the thread
that runs checks, and no database transaction is held while a receiver is slow, so a dead or hanging receiver
never holds up moderation.

Delivery is at least once: a worker that dies between sending and recording sends again once the lease ends.
Receivers deduplicate on `X-Item-Delivery`, the same on every attempt of one delivery.

What a platform receives:

- Callback: `POST <callback_url>` with the body `{"event": "check.finished", "check": {...}}` (the check as
  `item status --json` shows it) as canonical JSON (sorted keys, no spaces), and the headers
  `Content-Type: application/json`, `X-Item-Timestamp` (Unix seconds), `X-Item-Signature`
  (`v1=<hex HMAC-SHA256(secret, f"{timestamp}." + body)>`), `X-Item-Delivery` (the delivery id) and
  `User-Agent`. Any 2xx answer counts as delivered; redirects are not followed. Verify with
  `worker.outbox.signing.verify`.
- Stream: `XADD <ITEM_RESULTS_STREAM> MAXLEN ~ <ITEM_RESULTS_STREAM_MAXLEN> * check_id <id> external_id <id>
  delivery_id <id> body <canonical JSON>`. The stream name is used as given: `ITEM_REDIS_KEY_PREFIX` is not
  applied, since the name is the platform's interface, not one of this service's internal keys.

Errors, as "code: message" in `last_error`:

    callback.invalid     permanent  at submission: the callback URL is not http(s), has credentials, is too long...
    callback.no_secret   permanent  no ITEM_CALLBACK_SECRET: callbacks are never sent unsigned
    stream.unconfigured  permanent  a stream delivery with no ITEM_RESULTS_STREAM or no Redis to send it to
    stream.error         transient  Redis refused or could not be reached
    url.invalid, url.refused, url.unresolvable   permanent  (see worker/sources/fetch.py)
    anything else (url.http_5xx, url.http_4xx, url.timeout, url.connection...)  transient: retried with backoff
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ItemError
from worker.ledger.models import DeliveryRow, utcnow
from worker.ledger.outbox import claim_due, record_attempt
from worker.ledger.states import STREAM_TARGET, DeliveryStatus
from worker.ledger.views import shown_target, target_kind
from worker.ops import metrics
from worker.ops.logs import OutageLog
from worker.outbox.signing import canonical, sign
from worker.settings import Settings, backoff_s
from worker.sources.fetch import AddressPolicy, post

if TYPE_CHECKING:
    from worker.ledger.store import Ledger

log = logging.getLogger("item.delivery")

PASS_LIMIT = 50  # deliveries claimed per pass
SENDS_AT_ONCE = 8  # one slow receiver must not make every other delivery of the pass wait for it

# A target that can never work: retrying would only delay the `failed` an operator needs to see.
PERMANENT_CODES = frozenset(
    {"url.invalid", "url.refused", "url.unresolvable", "callback.invalid", "callback.no_secret", "stream.unconfigured"}
)


class DeliveryError(ItemError):
    """A delivery attempt that failed; `permanent` says whether another attempt could succeed."""

    code = "delivery.error"

    def __init__(self, message: str, *, code: str, permanent: bool):
        super().__init__(message, code=code)
        self.permanent = permanent


class Deliverer:
    """Sends due deliveries: `deliver_due` for one pass, `start` to run passes on a daemon thread."""

    def __init__(self, settings: Settings, ledger: Ledger):
        self.settings = settings
        self.ledger = ledger
        allowed = tuple(ipaddress.ip_network(network) for network in settings.callback_allowed_networks)
        self.policy = AddressPolicy(allowed=allowed)
        self._stream_client: Any = None
        self._client_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = None  # a worker.ops.supervise.Supervised once started

    # ------------------------------------------------------------------ passes

    def deliver_due(self, limit: int = PASS_LIMIT) -> int:
        """One pass: claims up to `limit` due deliveries, sends them, records each outcome; returns how many."""
        with self.ledger.session() as session:
            claimed = claim_due(session, limit, self._lease(limit))
        if not claimed:
            return 0
        with ThreadPoolExecutor(min(SENDS_AT_ONCE, len(claimed)), thread_name_prefix="item-delivery") as pool:
            list(pool.map(self.attempt, claimed))  # list(): re-raises what an attempt raised (the ledger is down)
        return len(claimed)

    def deliver_all_due(self) -> int:
        """Passes until nothing is due right now, then returns how many were attempted (the embedded mode).

        Retries scheduled for later stay pending. A failure is logged, never raised: the checks themselves are
        stored, and the outbox keeps their results for the next run.
        """
        attempted = 0
        try:
            while passed := self.deliver_due():
                attempted += passed
        except Exception:
            log.warning("delivering results failed; they stay in the ledger's outbox", exc_info=True)
        return attempted

    def _lease(self, limit: int) -> timedelta:
        # Long enough for every send of the pass to end: rounds of SENDS_AT_ONCE, each within its time limits
        # (a Redis connect and a command may each take callback_timeout_s), and a margin for the ledger.
        rounds = -(-limit // SENDS_AT_ONCE)
        return timedelta(seconds=rounds * (2 * self.settings.callback_timeout_s + 5) + 30)

    def attempt(self, row: DeliveryRow) -> str:
        """Sends one claimed delivery and records the outcome: "delivered", "retried" or "failed".

        Once `stop` was called, a delivery not yet sent is handed back instead ("released"): due again at once for
        another process, rather than hidden until its lease ends.
        """
        if self._stopping.is_set():
            with self.ledger.session() as session:
                record_attempt(session, row, {"attempts": row.attempts - 1, "next_attempt_at": utcnow()})
            return "released"
        try:
            self._send(row)
        except ItemError as error:
            return self._failed_attempt(row, error.code, error.message)
        except Exception as error:  # a bug, not the receiver: kept and retried rather than lost
            log.exception("delivery %s of check %s crashed", row.id, row.check_id)
            return self._failed_attempt(row, "delivery.internal_error", f"Internal error: {error!r}")
        delivered = {"status": DeliveryStatus.delivered, "delivered_at": utcnow(), "last_error": None}
        self._finish(row, "delivered", delivered)
        return "delivered"

    def _failed_attempt(self, row: DeliveryRow, code: str, message: str) -> str:
        values: dict = {"last_error": f"{code}: {message}"}
        if code in PERMANENT_CODES or row.attempts >= self.settings.delivery_max_attempts:
            values["status"] = DeliveryStatus.failed
            outcome = "failed"
        else:
            values["next_attempt_at"] = utcnow() + timedelta(seconds=self.backoff(row.attempts))
            outcome = "retried"
        self._finish(row, outcome, values, code=code, message=message)
        return outcome

    def _finish(self, row: DeliveryRow, outcome: str, values: dict, code: str | None = None, message: str = ""):
        with self.ledger.session() as session:
            recorded = record_attempt(session, row, values)
        kind = target_kind(row.target)
        metrics.DELIVERIES.labels(kind, outcome).inc()
        about = {"check_id": row.check_id, "external_id": _external_id(row), "stage": "deliver"}
        if code is not None:
            about["code"] = code
        note = "" if recorded else " (not recorded: the delivery was taken over after its lease ran out)"
        level = logging.WARNING if outcome == "failed" else logging.INFO
        said = f": {code}: {message}" if code else ""
        log.log(
            level,
            "delivery %s of check %s to %s %s after %d attempt(s)%s%s",
            row.id,
            row.check_id,
            shown_target(row.target),
            outcome,
            row.attempts,
            said,
            note,
            extra=about,
        )

    def backoff(self, attempts: int) -> float:
        """Seconds before the next attempt: doubling from delivery_backoff_s, capped, with ×0.5–1.5 jitter."""
        return backoff_s(attempts, self.settings.delivery_backoff_s, self.settings.delivery_backoff_max_s)

    # ------------------------------------------------------------------ targets

    def _send(self, row: DeliveryRow) -> None:
        if row.target == STREAM_TARGET:
            self._add_to_stream(row)
        else:
            self._call_back(row)

    def _call_back(self, row: DeliveryRow) -> None:
        secret = self.settings.callback_secret
        if secret is None or not secret.get_secret_value():
            raise DeliveryError(
                "No ITEM_CALLBACK_SECRET is set, and callbacks are never sent unsigned.",
                code="callback.no_secret",
                permanent=True,
            )
        body = canonical(row.body)
        timestamp = int(time.time())  # signed afresh on every attempt: receivers refuse stale timestamps
        headers = {
            "Content-Type": "application/json",
            "X-Item-Timestamp": str(timestamp),
            "X-Item-Signature": sign(secret.get_secret_value().encode(), timestamp, body),
            "X-Item-Delivery": row.id,  # the receiver's idempotency key: the same on every attempt
        }  # post() adds Host, Content-Length, User-Agent and Connection
        post(row.target, body, headers, timeout_s=self.settings.callback_timeout_s, policy=self.policy)

    def _add_to_stream(self, row: DeliveryRow) -> None:
        import redis

        stream = self.settings.results_stream
        if not stream:
            raise DeliveryError(
                "This delivery is for the results stream, but ITEM_RESULTS_STREAM is not set.",
                code="stream.unconfigured",
                permanent=True,
            )
        fields = {
            "check_id": row.check_id,
            "external_id": _external_id(row),
            "delivery_id": row.id,
            "body": canonical(row.body),
        }
        try:
            self._stream().xadd(stream, fields, maxlen=self.settings.results_stream_maxlen, approximate=True)
        except redis.RedisError as error:
            raise DeliveryError(
                f"Adding to stream {stream} failed: {error}", code="stream.error", permanent=False
            ) from error

    def _stream(self):
        """One Redis client per deliverer (thread-safe, pooled), made on first use."""
        import redis

        url = self.settings.results_stream_url or self.settings.broker_url
        if not url:
            raise DeliveryError(
                "No Redis for the results stream: set ITEM_RESULTS_STREAM_URL or ITEM_BROKER_URL.",
                code="stream.unconfigured",
                permanent=True,
            )
        with self._client_lock:
            if self._stream_client is None:
                timeout = self.settings.callback_timeout_s
                self._stream_client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
            return self._stream_client

    # ------------------------------------------------------------------ the thread

    def start(self) -> None:
        """Runs passes on a daemon thread every `delivery_poll_s` (at once again after a full pass) until `stop`."""
        from worker.ops.supervise import Supervised

        if self._thread is not None and self._thread.is_alive():
            return
        self._stopping.clear()
        self._thread = Supervised("deliverer", self._run, stopping=self._stopping).start()

    def stop(self, timeout: float | None = None) -> None:
        """Asks the thread to end after its current pass, and waits up to `timeout` for it."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.stop(timeout)

    def _run(self) -> None:
        outage = OutageLog(
            log,
            "delivery pass failed; the deliveries stay pending and are tried again",
            "delivery passes still failing",
        )
        while not self._stopping.is_set():
            try:
                full = self.deliver_due() >= PASS_LIMIT
                outage.recovered()
            except Exception:  # the ledger is down, say: results wait in the outbox, the thread carries on
                outage.failed()
                full = False
            if not full:
                self._stopping.wait(self.settings.delivery_poll_s)


def _external_id(row: DeliveryRow) -> str | None:
    check = row.body.get("check") if isinstance(row.body, dict) else None
    return check.get("external_id") if isinstance(check, dict) else None
