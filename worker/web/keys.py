"""API keys: `item_<id>_<secret>`. The id is public (it names the key in lists and logs); only a SHA-256 of the
secret is stored, and the secret is compared in constant time.

The secret is 32 random bytes, so a plain hash is enough: a slow password hash guards guessable secrets,
and these cannot be guessed. A key's scopes say what it may do; `admin` may do everything.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass

from pipeline.core.errors import ItemError
from worker.ledger import access
from worker.ledger.models import utcnow
from worker.ledger.store import Ledger

SCOPES = ("submit", "read", "review", "admin")
KEY_PATTERN = re.compile(r"^item_(k[0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
CACHE_S = 5.0  # how long a process trusts a key it checked: a revoked key is refused within this
TOUCH_EVERY_S = 60.0  # last_used_at is written at most this often per key and process, not on every request


class InvalidKeyRequest(ItemError):
    """A key asked for with scopes or a name it cannot have (`item keys create`)."""

    code = "key.invalid"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's id, name and scopes."""

    key_id: str
    name: str
    scopes: frozenset[str]

    def may(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


@dataclass(frozen=True)
class NewKey:
    key: str  # shown once
    key_id: str
    name: str
    scopes: list[str]


def hashed(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def checked_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise InvalidKeyRequest(f"Scopes must be among {', '.join(SCOPES)}; got {', '.join(unknown) or 'none'}.")
    return [scope for scope in SCOPES if scope in scopes]


def create_key(ledger: Ledger, name: str, scopes: list[str]) -> NewKey:
    name = name.strip()
    if not name or len(name) > 128:
        raise InvalidKeyRequest("A key needs a name of 1 to 128 characters (who or what uses it).")
    scopes = checked_scopes(scopes)
    key_id, secret = "k" + secrets.token_hex(6), secrets.token_urlsafe(32)
    with ledger.session() as session:
        access.add_key(session, key_id, name, scopes, hashed(secret))
    return NewKey(f"item_{key_id}_{secret}", key_id, name, scopes)


class Authenticator:
    """Turns a presented key into a Principal, or None (and the reason, for the failure metric)."""

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self._known: dict[str, tuple[float, str, Principal | None]] = {}  # id: (checked at, secret hash, who)
        self._touched: dict[str, float] = {}
        self._lock = threading.Lock()

    def principal(self, presented: str | None) -> tuple[Principal | None, str]:
        if not presented:
            return None, "missing"
        match = KEY_PATTERN.match(presented.strip())
        if match is None:
            return None, "malformed"
        key_id, secret_hash = match.group(1), hashed(match.group(2))
        stored_hash, who = self._lookup(key_id)
        if who is None or not hmac.compare_digest(stored_hash, secret_hash):
            return None, "unknown"
        self._touch(key_id)
        return who, "ok"

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._known.pop(key_id, None)

    def _lookup(self, key_id: str) -> tuple[str, Principal | None]:
        now = time.monotonic()
        with self._lock:
            cached = self._known.get(key_id)
        if cached is not None and now - cached[0] < CACHE_S:
            return cached[1], cached[2]
        with self.ledger.session() as session:
            row = access.get_key(session, key_id)
            if row is None or row.revoked_at is not None:
                entry = (now, "", None)
            else:
                entry = (now, row.secret_sha256, Principal(row.id, row.name, frozenset(row.scopes)))
        with self._lock:
            if len(self._known) > 10_000:  # presented ids are the caller's choice: never an unbounded cache
                self._known.clear()
            self._known[key_id] = entry
        return entry[1], entry[2]

    def _touch(self, key_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(key_id, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
                return
            self._touched[key_id] = now
        with self.ledger.session() as session:
            access.touch_key(session, key_id, utcnow())
