"""Signed callbacks: how the service signs a result body, and how a platform's receiver checks it.

Standard library only, so a receiver can `from worker.outbox.signing import verify` without the service's
dependencies. The signature is `v1=<hex HMAC-SHA256(secret, f"{timestamp}." + body)>` over the exact bytes
sent; the body is canonical JSON, so every retry of one delivery sends (and signs) the same bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time

SIGNATURE_VERSION = "v1"
SIGNATURE_TOLERANCE_S = 300
_TIMESTAMP = re.compile(r"[0-9]{1,12}")


def canonical(body: dict) -> bytes:
    """The bytes sent and signed: one encoding of the stored body, so every retry sends the same bytes."""
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def sign(secret: bytes, timestamp: int, body: bytes) -> str:
    """The `X-Item-Signature` value: `v1=` and the hex HMAC-SHA256 of `f"{timestamp}."` + body under `secret`."""
    digest = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"{SIGNATURE_VERSION}={digest}"


def verify(
    secret: bytes | str,
    body: bytes,
    timestamp_header: str | None,
    signature_header: str | None,
    *,
    tolerance_s: float = SIGNATURE_TOLERANCE_S,
    now: float | None = None,
) -> bool:
    """Whether a callback really comes from this service: what a platform's receiver calls, before parsing.

    `body` must be the raw request bytes (not re-encoded JSON); the headers are `X-Item-Timestamp` and
    `X-Item-Signature` as received (None when missing). False for a wrong secret, a changed body, a timestamp
    more than `tolerance_s` away from `now` (a replayed request), or malformed headers. The signature header may
    list several `v1=` values separated by commas; one match is enough.

        from worker.outbox.signing import verify
        if not verify(SECRET, request.body, request.headers.get("X-Item-Timestamp"),
                      request.headers.get("X-Item-Signature")):
            return 401
    """
    if not isinstance(timestamp_header, str) or not isinstance(signature_header, str):
        return False
    if not _TIMESTAMP.fullmatch(timestamp_header.strip()):
        return False
    timestamp = int(timestamp_header)
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        return False
    key = secret.encode() if isinstance(secret, str) else secret
    expected = sign(key, timestamp, body).encode()
    offered = [part.strip().encode() for part in signature_header.split(",")]
    # Every value is compared, each in constant time, so the time taken says nothing about the right one.
    return any([hmac.compare_digest(expected, value) for value in offered if value.startswith(b"v1=")])
