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
from collections import OrderedDict
from dataclasses import dataclass

from pipeline.core.errors import ItemError
from worker.ledger import access, tenants
from worker.ledger.models import DEFAULT_TENANT, utcnow
from worker.ledger.store import Ledger

SCOPES = ("submit", "read", "review", "admin")
KEY_PATTERN = re.compile(r"^item_(k[0-9a-f]{12})_([A-Za-z0-9_-]{43})$")
CACHE_S = 5.0  # how long a process trusts a key it checked: a revoked key is refused within this
TOUCH_EVERY_S = 60.0  # last_used_at is written at most this often per key and process, not on every request
KNOWN_KEYS = 10_000  # ids of keys that exist, kept per process (least recently presented dropped first)
UNKNOWN_KEYS = 1_000  # ids found to name no usable key: a client retrying a wrong key asks the ledger once per CACHE_S


class InvalidKeyRequest(ItemError):
    """A key asked for with scopes or a name it cannot have (`item keys create`)."""

    code = "key.invalid"


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's id, name, scopes and tenant. `tenant_id` None is an operator key, made explicitly
    (`item keys create --all-tenants`), which reads every tenant's checks; any other key sees its tenant's only."""

    key_id: str
    name: str
    scopes: frozenset[str]
    tenant_id: str | None = DEFAULT_TENANT

    def may(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes

    @property
    def all_tenants(self) -> bool:
        return self.tenant_id is None

    def tenant_scope(self, asked: str | None = None) -> str | None:
        """The tenant a read is narrowed to: the key's own; for an operator key the one `asked` for, or None (all).
        A tenant key asking for another tenant still gets its own: what it may see does not depend on asking."""
        return asked if self.all_tenants else self.tenant_id

    @classmethod
    def of(cls, row) -> Principal:
        return cls(row.id, row.name, frozenset(row.scopes), row.tenant_id)


@dataclass(frozen=True)
class NewKey:
    key: str  # shown once
    key_id: str
    name: str
    scopes: list[str]
    tenant_id: str | None  # None: an operator key of every tenant


def hashed(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def checked_scopes(scopes: list[str]) -> list[str]:
    unknown = sorted(set(scopes) - set(SCOPES))
    if unknown or not scopes:
        raise InvalidKeyRequest(f"Scopes must be among {', '.join(SCOPES)}; got {', '.join(unknown) or 'none'}.")
    return [scope for scope in SCOPES if scope in scopes]


def create_key(
    ledger: Ledger, name: str, scopes: list[str], *, tenant_id: str | None = DEFAULT_TENANT, all_tenants: bool = False
) -> NewKey:
    """A new key of `tenant_id` (which must exist); `all_tenants` makes an operator key that reads every tenant,
    and must be asked for explicitly, never as a default."""
    name = name.strip()
    if not name or len(name) > 128:
        raise InvalidKeyRequest("A key needs a name of 1 to 128 characters (who or what uses it).")
    scopes = checked_scopes(scopes)
    if all_tenants == (tenant_id is not None):
        raise InvalidKeyRequest("A key belongs to one tenant (--tenant), or is an operator key of all (--all-tenants).")
    key_id, secret = "k" + secrets.token_hex(6), secrets.token_urlsafe(32)
    with ledger.session() as session:
        if tenant_id is not None:
            tenants.require_tenant(session, tenant_id)
        access.add_key(session, key_id, name, scopes, hashed(secret), tenant_id)
    return NewKey(f"item_{key_id}_{secret}", key_id, name, scopes, tenant_id)


class _Recent:
    """A bounded map that drops its least recently used entry when full."""

    def __init__(self, size: int):
        self.size = size
        self._entries: OrderedDict[str, tuple] = OrderedDict()

    def get(self, key: str) -> tuple | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: tuple) -> None:
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def pop(self, key: str) -> None:
        self._entries.pop(key, None)


class Authenticator:
    """Turns a presented key into a Principal, or None (and the reason, for the failure metric).

    Presented ids are the caller's choice, so what they find is kept apart: ids of real keys in one cache, ids that
    name no usable key in another, each bounded on its own. Spraying made-up ids churns only the second, and never
    sends the keys in use back to the ledger on every request.
    """

    def __init__(self, ledger: Ledger):
        self.ledger = ledger
        self._known = _Recent(KNOWN_KEYS)  # id: (checked at, secret hash, who)
        self._unknown = _Recent(UNKNOWN_KEYS)  # id: (checked at,)
        self._touched: dict[str, float] = {}  # only ids of real keys: as many as the ledger holds
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
            self._known.pop(key_id)
            self._unknown.pop(key_id)

    def _lookup(self, key_id: str) -> tuple[str, Principal | None]:
        cached = self._cached(key_id, time.monotonic())
        if cached is not None:
            return cached
        now = time.monotonic()
        with self.ledger.session() as session:
            row = access.get_key(session, key_id)
            usable = row is not None and row.revoked_at is None
            found = (row.secret_sha256, Principal.of(row)) if usable else ("", None)
        with self._lock:
            if found[1] is None:  # revoked, or never was: remembered apart, so no key in use is dropped for it
                self._known.pop(key_id)
                self._unknown.put(key_id, (now,))
            else:
                self._unknown.pop(key_id)
                self._known.put(key_id, (now, *found))
        return found

    def _cached(self, key_id: str, now: float) -> tuple[str, Principal | None] | None:
        """What this process learnt of `key_id` within CACHE_S, or None to ask the ledger."""
        with self._lock:
            known = self._known.get(key_id)
            if known is not None and now - known[0] < CACHE_S:
                return known[1], known[2]
            unknown = self._unknown.get(key_id)
            if unknown is not None and now - unknown[0] < CACHE_S:
                return "", None
        return None

    def _touch(self, key_id: str) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._touched.get(key_id, -TOUCH_EVERY_S) < TOUCH_EVERY_S:
                return
            self._touched[key_id] = now
        with self.ledger.session() as session:
            access.touch_key(session, key_id, utcnow())
