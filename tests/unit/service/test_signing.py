"""Callback signatures: what `sign` makes, `verify` (the platform's side) accepts, and nothing else."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from worker.outbox.signing import canonical, sign, verify

SECRET = b"shared-secret"
NOW = 1_900_000_000
BODY = canonical({"event": "check.finished", "check": {"id": "c-1", "verdict": "fake", "p_fake": 0.91}})


def _headers(secret: bytes = SECRET, timestamp: int = NOW, body: bytes = BODY) -> tuple[str, str]:
    return str(timestamp), sign(secret, timestamp, body)


def test_a_signature_is_hmac_sha256_over_timestamp_dot_body():
    expected = hmac.new(SECRET, f"{NOW}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert sign(SECRET, NOW, BODY) == f"v1={expected}"


def test_round_trip_verifies():
    assert verify(SECRET, BODY, *_headers(), now=NOW)
    assert verify(SECRET.decode(), BODY, *_headers(), now=NOW + 299)  # a str secret is the same secret


def test_a_wrong_secret_fails():
    assert not verify(b"another-secret", BODY, *_headers(), now=NOW)
    assert not verify(SECRET, BODY, *_headers(secret=b"another-secret"), now=NOW)


def test_a_tampered_body_fails():
    tampered = BODY.replace(b'"fake"', b'"real"')
    assert tampered != BODY
    assert not verify(SECRET, tampered, *_headers(), now=NOW)
    assert not verify(SECRET, BODY + b" ", *_headers(), now=NOW)


def test_a_changed_timestamp_fails_even_when_fresh():
    _, signature = _headers()
    assert not verify(SECRET, BODY, str(NOW + 1), signature, now=NOW)


@pytest.mark.parametrize("age", [301, -301, 86_400])
def test_stale_or_future_timestamps_fail(age):
    timestamp, signature = _headers()
    assert not verify(SECRET, BODY, timestamp, signature, now=NOW + age)
    assert verify(SECRET, BODY, timestamp, signature, now=NOW + age, tolerance_s=abs(age))


@pytest.mark.parametrize(
    ("timestamp", "signature"),
    [
        (None, sign(SECRET, NOW, BODY)),
        (str(NOW), None),
        ("", sign(SECRET, NOW, BODY)),
        ("-1", sign(SECRET, -1, BODY)),
        ("1.9e9", sign(SECRET, NOW, BODY)),
        ("１９００００００００", sign(SECRET, NOW, BODY)),  # fullwidth digits: int() takes them, the header may not
        (str(NOW), sign(SECRET, NOW, BODY).removeprefix("v1=")),  # no version
        (str(NOW), "v2=" + sign(SECRET, NOW, BODY).removeprefix("v1=")),  # an unknown version
        (str(NOW), "v1="),
        (str(NOW), ""),
    ],
)
def test_malformed_headers_fail(timestamp, signature):
    assert not verify(SECRET, BODY, timestamp, signature, now=NOW)


def test_one_matching_value_in_a_list_is_enough():
    _, signature = _headers()
    assert verify(SECRET, BODY, str(NOW), f"v1=00ff, {signature}", now=NOW)
    assert not verify(SECRET, BODY, str(NOW), "v1=00ff,v1=abcd", now=NOW)


def test_canonical_json_ignores_key_order():
    assert canonical({"b": 1, "a": [1, 2]}) == canonical({"a": [1, 2], "b": 1}) == b'{"a":[1,2],"b":1}'
