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
  (`kid=<key id>;v1=<hex HMAC-SHA256(secret, f"{timestamp}." + body)>`, one per secret of the check's tenant
  that signs now, comma-separated; `v1=<hex>` without a key id for ITEM_CALLBACK_SECRET: see
  `worker.outbox.signing` and `SigningSecrets`), `X-Item-Delivery` (the delivery id) and `User-Agent`. Any 2xx
  answer counts as delivered; redirects are not followed. Verify with `worker.outbox.signing.verify`.
- Stream: `XADD <ITEM_RESULTS_STREAM> MINID ~ <now - ITEM_RESULTS_STREAM_RETENTION_S, in ms> * check_id <id>
  external_id <id> delivery_id <id> body <canonical JSON>`: entries stay for the retention, whatever the rate
  (approximately: Redis drops whole nodes of ~100 entries), and ITEM_RESULTS_STREAM_MAXLEN, if set, caps the
  length too. Every stream delivery of one pass goes in one pipeline: one round trip to Redis. The stream name
  is used as given: `ITEM_REDIS_KEY_PREFIX` is not applied, since the name is the platform's interface, not one
  of this service's internal keys.

Callbacks to one receiver reuse keep-alive connections (`worker.sources.keepalive`), a few per host.

Errors, as "code: message" in `last_error`:

    callback.invalid     permanent  at submission: the callback URL is not http(s), has credentials, is too long...
    callback.no_secret   permanent  the tenant has no callback secret (the default tenant: nor ITEM_CALLBACK_SECRET):
                                    callbacks are never sent unsigned
    callback.secrets_unreadable  transient  the ledger could not be read for the tenant's secrets
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
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from pipeline.core.errors import ItemError
from worker.ledger.callback_secrets import signing_secrets
from worker.ledger.models import DEFAULT_TENANT, DeliveryRow, utcnow
from worker.ledger.outbox import claim_due, record_attempt
from worker.ledger.states import STREAM_TARGET, DeliveryStatus
from worker.ledger.views import shown_target, target_kind
from worker.ops import metrics
from worker.ops.logs import OutageLog
from worker.outbox.signing import canonical, signature_header
from worker.settings import Settings, backoff_s
from worker.sources.fetch import AddressPolicy, post
from worker.sources.keepalive import KeptConnections

if TYPE_CHECKING:
    from worker.ledger.store import Ledger

log = logging.getLogger("item.delivery")

PASS_LIMIT = 50  # deliveries claimed per pass
SECRETS_CACHE_S = 5.0  # how long a deliverer signs with the secrets it read: a rotation or retirement takes this
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
        self._kept = KeptConnections(per_host=SENDS_AT_ONCE)  # callbacks' idle keep-alive connections
        self._secrets = SigningSecrets(settings, ledger)
        self._client_lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = None  # a worker.ops.supervise.Supervised once started

    # ------------------------------------------------------------------ passes

    def deliver_due(self, limit: int = PASS_LIMIT) -> int:
        """One pass: claims up to `limit` due deliveries, sends them, records each outcome; returns how many."""
        with self.ledger.session() as session:
            claimed = claim_due(session, limit, self._lease(limit))
        streamed = [row for row in claimed if row.target == STREAM_TARGET]
        called = [row for row in claimed if row.target != STREAM_TARGET]
        if streamed:
            self.attempt_stream(streamed)
        if called:
            with ThreadPoolExecutor(min(SENDS_AT_ONCE, len(called)), thread_name_prefix="item-delivery") as pool:
                list(pool.map(self.attempt, called))  # list(): re-raises what an attempt raised (the ledger is down)
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
            return self._release_unsent([row])[0]
        try:
            self._send(row)
        except Exception as error:
            return self._finish([self._outcome(row, error)])[0]
        return self._finish([self._outcome(row, None)])[0]

    def attempt_stream(self, rows: list[DeliveryRow]) -> list[str]:
        """`attempt` for stream deliveries, all in one Redis pipeline and their outcomes in one transaction."""
        if self._stopping.is_set():
            return self._release_unsent(rows)
        errors = self._add_all_to_stream(rows)
        return self._finish([self._outcome(row, error) for row, error in zip(rows, errors, strict=True)])

    def _release_unsent(self, rows: list[DeliveryRow]) -> list[str]:
        with self.ledger.session() as session:
            for row in rows:
                record_attempt(session, row, {"attempts": row.attempts - 1, "next_attempt_at": utcnow()})
        return ["released"] * len(rows)

    def _outcome(self, row: DeliveryRow, error: Exception | None) -> _Outcome:
        """What to record of one attempt: delivered (no error), retried later, or failed for good."""
        if error is None:
            delivered = {"status": DeliveryStatus.delivered, "delivered_at": utcnow(), "last_error": None}
            return _Outcome(row, "delivered", delivered)
        if isinstance(error, ItemError):
            code, message = error.code, error.message
        else:  # a bug, not the receiver: kept and retried rather than lost
            log.error("delivery %s of check %s crashed", row.id, row.check_id, exc_info=error)
            code, message = "delivery.internal_error", f"Internal error: {error!r}"
        values: dict = {"last_error": f"{code}: {message}"}
        if code in PERMANENT_CODES or row.attempts >= self.settings.delivery_max_attempts:
            values["status"] = DeliveryStatus.failed
            return _Outcome(row, "failed", values, code, message)
        values["next_attempt_at"] = utcnow() + timedelta(seconds=self.backoff(row.attempts))
        return _Outcome(row, "retried", values, code, message)

    def _finish(self, outcomes: list[_Outcome]) -> list[str]:
        """Records the outcomes in one transaction, then counts and logs each; returns them."""
        with self.ledger.session() as session:
            recorded = [record_attempt(session, done.row, done.values) for done in outcomes]
        for done, kept in zip(outcomes, recorded, strict=True):
            self._report(done, kept)
        return [done.outcome for done in outcomes]

    def _report(self, done: _Outcome, recorded: bool) -> None:
        row, outcome, code, message = done.row, done.outcome, done.code, done.message
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
            error = self._add_all_to_stream([row])[0]
            if error is not None:
                raise error
        else:
            self._call_back(row)

    def _call_back(self, row: DeliveryRow) -> None:
        secrets = self._secrets.signing(row.tenant_id)
        if not secrets:
            raise DeliveryError(_no_secret(row.tenant_id), code="callback.no_secret", permanent=True)
        body = canonical(row.body)
        timestamp = int(time.time())  # signed afresh on every attempt: receivers refuse stale timestamps
        headers = {
            "Content-Type": "application/json",
            "X-Item-Timestamp": str(timestamp),
            "X-Item-Signature": signature_header(secrets, timestamp, body),
            "X-Item-Delivery": row.id,  # the receiver's idempotency key: the same on every attempt
        }  # post() adds Host, Content-Length, User-Agent and Connection
        timeout_s = self.settings.callback_timeout_s
        post(row.target, body, headers, timeout_s=timeout_s, policy=self.policy, kept=self._kept)

    def _add_all_to_stream(self, rows: list[DeliveryRow]) -> list[DeliveryError | None]:
        """Adds every row to the stream in one pipeline (one round trip); returns each one's error, if any.

        Not a MULTI transaction: one entry Redis refuses must not hold back the others.
        """
        import redis

        stream = self.settings.results_stream
        try:
            if not stream:
                raise DeliveryError(
                    "This delivery is for the results stream, but ITEM_RESULTS_STREAM is not set.",
                    code="stream.unconfigured",
                    permanent=True,
                )
            pipeline = self._stream().pipeline(transaction=False)
        except DeliveryError as error:
            return [error] * len(rows)
        oldest_kept = self._oldest_kept_id()
        for row in rows:
            pipeline.xadd(stream, _stream_fields(row), minid=oldest_kept, approximate=True)
        if self.settings.results_stream_maxlen:
            pipeline.xtrim(stream, maxlen=self.settings.results_stream_maxlen, approximate=True)
        try:
            answers = pipeline.execute(raise_on_error=False)
        except redis.RedisError as error:  # Redis unreachable: nothing of the pass was added, or not knowably
            answers = [error] * len(rows)
        return [_stream_error(stream, answer) for answer in answers[: len(rows)]]

    def _oldest_kept_id(self) -> str:
        """The stream ID (milliseconds since the epoch) before which entries are past ITEM_RESULTS_STREAM_RETENTION_S.

        From this host's clock, while entry IDs come from the Redis server's: hosts kept within seconds of each
        other (NTP) make that a few seconds' difference on a retention of hours.
        """
        return str(int((time.time() - self.settings.results_stream_retention_s) * 1000))

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
        self._kept.close()

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


RECHECK_S = 1.0  # a tenant without a secret: how often its callbacks may read the ledger again for one


class SigningSecrets:
    """Each tenant's secrets that sign now, read from the ledger at most every SECRETS_CACHE_S (one query for
    every tenant), so a pass does not query per delivery.

    A cached secret whose `retires_at` passed stops signing at once; a rotation or an early retirement is seen
    within SECRETS_CACHE_S (so after `rotate --window 0` the old secret may sign for up to that long: a receiver
    that switched at once refuses those callbacks, and they are retried). A tenant with no secret cached is read
    again before its callback fails (a tenant found without one, at most every RECHECK_S), so a tenant's first
    secret signs at once. The default tenant also signs with ITEM_CALLBACK_SECRET, unnamed, while it is set:
    alone, the header is exactly that of before tenants.
    """

    def __init__(self, settings: Settings, ledger: Ledger, cache_s: float = SECRETS_CACHE_S):
        self.ledger = ledger
        self.cache_s = cache_s
        unnamed = settings.callback_secret.get_secret_value() if settings.callback_secret else ""
        self._unnamed = unnamed.encode() or None
        self._lock = threading.Lock()
        self._rows: dict[str, list[tuple[str, bytes, datetime | None]]] = {}
        self._read_at = float("-inf")
        self._missed: dict[str, float] = {}  # tenant: when a read found it had no secret (bounded by the tenants)

    def signing(self, tenant_id: str) -> list[tuple[str | None, bytes]]:
        """(key id, secret) of every secret that signs a callback of `tenant_id` now; key id None: the unnamed."""
        unnamed = [(None, self._unnamed)] if self._unnamed and tenant_id == DEFAULT_TENANT else []
        named = self._named(tenant_id, fresh=False)
        if not named and not unnamed:
            named = self._named(tenant_id, fresh=True)
        return unnamed + named

    def forget(self) -> None:
        """Reads the ledger again at the next callback (tests, and an operator's `rotate` in this process)."""
        with self._lock:
            self._read_at = float("-inf")

    def _named(self, tenant_id: str, *, fresh: bool) -> list[tuple[str, bytes]]:
        with self._lock:
            now_s = time.monotonic()
            # Read again when stale, or for a tenant found without a secret, unless it was so within RECHECK_S: a
            # tenant that has none costs one read a second, not one per delivery.
            recheck = fresh and now_s - self._missed.get(tenant_id, float("-inf")) > RECHECK_S
            if recheck or now_s - self._read_at > self.cache_s:
                self._read()
            rows = self._rows.get(tenant_id, [])
            if fresh and not rows:
                self._missed[tenant_id] = now_s
        now = utcnow()
        return [(key_id, secret) for key_id, secret, retires_at in rows if retires_at is None or retires_at > now]

    def _read(self) -> None:
        import sqlalchemy as sa

        rows: dict[str, list[tuple[str, bytes, datetime | None]]] = {}
        try:
            with self.ledger.session() as session:
                for row in signing_secrets(session):  # newest first: the current secret leads
                    rows.setdefault(row.tenant_id, []).append((row.key_id, row.secret.encode(), row.retires_at))
        except sa.exc.SQLAlchemyError as error:  # the ledger is down: sent later, when it is back
            raise DeliveryError(
                f"The callback secrets could not be read from the ledger: {error.__class__.__name__}",
                code="callback.secrets_unreadable",
                permanent=False,
            ) from error
        self._rows, self._read_at = rows, time.monotonic()


def _no_secret(tenant_id: str) -> str:
    if tenant_id == DEFAULT_TENANT:
        return (
            "No ITEM_CALLBACK_SECRET is set and the default tenant has no callback secret (`item secrets create "
            "--tenant default`), and callbacks are never sent unsigned."
        )
    return (
        f"Tenant {tenant_id!r} has no callback secret (`item secrets create --tenant {tenant_id}`), and callbacks "
        "are never sent unsigned."
    )


def _external_id(row: DeliveryRow) -> str | None:
    check = row.body.get("check") if isinstance(row.body, dict) else None
    return check.get("external_id") if isinstance(check, dict) else None


@dataclass(frozen=True)
class _Outcome:
    """One attempt's outcome ("delivered", "retried", "failed") and the values recorded on its row."""

    row: DeliveryRow
    outcome: str
    values: dict
    code: str | None = None
    message: str = ""


def _stream_fields(row: DeliveryRow) -> dict:
    return {
        "check_id": row.check_id,
        "external_id": _external_id(row),
        "delivery_id": row.id,
        "body": canonical(row.body),
    }


def _stream_error(stream: str, answer: Any) -> DeliveryError | None:
    """None for an entry ID Redis answered; the error of a command Redis refused, or of the whole pipeline."""
    if not isinstance(answer, Exception):
        return None
    return DeliveryError(f"Adding to stream {stream} failed: {answer}", code="stream.error", permanent=False)
