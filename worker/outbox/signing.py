"""Signed callbacks: how the service signs a result body, and how a platform's receiver checks it.

Standard library only, so a receiver can `from worker.outbox.signing import verify` without the service's
dependencies. A signature is the hex HMAC-SHA256 under one secret of `f"{timestamp}." + body`, over the exact
bytes sent; the body is canonical JSON, so every retry of one delivery sends (and signs) the same bytes.

The `X-Item-Signature` header lists one signature per secret that signs (two during a rotation), separated by
commas; each names its secret's key id, except the one made with ITEM_CALLBACK_SECRET (the default tenant's
unnamed secret), which is exactly the header of before key ids existed:

    X-Item-Signature: kid=cs0123456789ab;v1=<64 hex>, kid=cs89abcdef0123;v1=<64 hex>
    X-Item-Signature: v1=<64 hex>

An entry is `;`-separated `name=value` parameters; a receiver ignores parameters it does not know (a later `v2`)
and entries whose key id it does not know.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import Iterable, Mapping

SIGNATURE_VERSION = "v1"
SIGNATURE_TOLERANCE_S = 300
_TIMESTAMP = re.compile(r"[0-9]{1,12}")
KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,32}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
MAX_HEADER_CHARS = 4096  # a few dozen entries: a longer header is refused before any work on it
MAX_SIGNATURES = 16  # entries looked at; more is refused (a sender signs with two, three in a hurried rotation)


def canonical(body: dict) -> bytes:
    """The bytes sent and signed: one encoding of the stored body, so every retry sends the same bytes."""
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """One unnamed signature, `v1=` and the hex HMAC-SHA256 of `f"{timestamp}."` + body under `secret`: the whole
    header of a callback signed only with ITEM_CALLBACK_SECRET."""
    return f"{SIGNATURE_VERSION}={_digest(secret, timestamp, body)}"


def signature_header(secrets: Iterable[tuple[str | None, bytes]], timestamp: int, body: bytes) -> str:
    """The `X-Item-Signature` value: one entry per (key id, secret), `kid=<id>;v1=<hex>`, or `v1=<hex>` for the
    unnamed secret (key id None)."""
    entries = []
    for key_id, secret in secrets:
        if key_id is not None and not KEY_ID.fullmatch(key_id):
            raise ValueError(f"Key id {key_id!r} is not 1 to 32 of A-Z, a-z, 0-9, '_' and '-'.")
        signed = sign(secret, timestamp, body)
        entries.append(signed if key_id is None else f"kid={key_id};{signed}")
    return ", ".join(entries)


def parse_signatures(signature_header: str) -> list[tuple[str | None, str]] | None:
    """The header's well-formed (key id or None, hex digest) entries; None for a header refused whole (not a
    string, longer than MAX_HEADER_CHARS, more than MAX_SIGNATURES entries). Never an exception.

    An entry is skipped (it can match nothing) without a well-formed `v1`, with a parameter lacking `=` or given
    twice, or with a bad key id. Unknown parameters are ignored, so a later version can add its own beside `v1`.
    """
    if not isinstance(signature_header, str) or len(signature_header) > MAX_HEADER_CHARS:
        return None
    entries = signature_header.split(",")
    if len(entries) > MAX_SIGNATURES:
        return None
    parsed = [_entry(entry) for entry in entries]
    return [entry for entry in parsed if entry is not None]


def _entry(entry: str) -> tuple[str | None, str] | None:
    params: dict[str, str] = {}
    for param in entry.split(";"):
        name, equals, value = param.strip().partition("=")
        if not equals or not name or name in params:
            return None
        params[name] = value
    key_id, digest = params.get("kid"), params.get(SIGNATURE_VERSION)
    if digest is None or not _DIGEST.fullmatch(digest):
        return None
    if key_id is not None and not KEY_ID.fullmatch(key_id):
        return None
    return key_id, digest


def verify(
    secrets: bytes | str | Mapping[str, bytes | str],
    body: bytes,
    timestamp_header: str | None,
    signature_header: str | None,
    *,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether a callback really comes from this service: what a platform's receiver calls, before parsing.

    `secrets` is the receiver's one secret, or, during its own rotation, its secrets by key id
    (`{"cs0123456789ab": old, "cs89abcdef0123": new}`): one signature under a secret the receiver holds is enough.
    A single secret is tried against every signature of the header; a mapping's secret only against the
    signatures naming its key id (and against the unnamed one, for ITEM_CALLBACK_SECRET). `body` must be the raw
    request bytes (not re-encoded JSON); the headers are `X-Item-Timestamp` and `X-Item-Signature` as received
    (None when missing). False for a wrong secret, a changed body, a timestamp more than `tolerance_s` away from
    `now` (a replayed request), or malformed headers; never an exception for anything a sender put in them.

        from worker.outbox.signing import verify
        if not verify(SECRETS, request.body, request.headers.get("X-Item-Timestamp"),
                      request.headers.get("X-Item-Signature")):
            return 401
    """
    if not isinstance(timestamp_header, str) or not _TIMESTAMP.fullmatch(timestamp_header.strip()):
        return False
    timestamp = int(timestamp_header)
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    offered = parse_signatures(signature_header) if isinstance(signature_header, str) else None
    if not offered:
        return False
    if isinstance(secrets, Mapping):
        known = {key_id: _key(secret) for key_id, secret in secrets.items()}
    else:
        known = {None: _key(secrets)}
    expected = {key_id: _digest(key, timestamp, body).encode() for key_id, key in known.items()}
    matches = []
    for key_id, digest in offered:
        # Every candidate compared, each in constant time, so the time taken says nothing about the right one.
        matches.extend(
            hmac.compare_digest(expected[known_id], digest.encode()) for known_id in _candidates(key_id, expected)
        )
    return any(matches)


def _candidates(key_id: str | None, expected: dict) -> list:
    """The receiver's key ids a signature is checked against: all of them for an unnamed signature or a receiver
    holding one secret without a key id; else its own, or none for a key id the receiver does not know."""
    if key_id is None or None in expected:
        return list(expected)
    return [key_id] if key_id in expected else []


def _key(secret: bytes | str) -> bytes:
    return secret.encode() if isinstance(secret, str) else secret


def _digest(secret: bytes, timestamp: int, body: bytes) -> str:
    return hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
