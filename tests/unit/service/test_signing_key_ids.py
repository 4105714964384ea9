"""Signatures named by key id: several in one header during a rotation, and a receiver's `verify` with one secret
or its secrets by key id. Whatever a sender puts in the header, `verify` answers True or False, never raises."""

from __future__ import annotations

import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.outbox.signing import (
    MAX_HEADER_CHARS,
    MAX_SIGNATURES,
    canonical,
    parse_signatures,
    sign,
    signature_header,
    verify,
)

OLD, NEW, OTHER = b"old-secret", b"new-secret", b"another-tenants-secret"
NOW = 1_900_000_000
BODY = canonical({"event": "check.finished", "check": {"id": "c-1", "verdict": "fake"}})


def _rotating(timestamp: int = NOW) -> str:
    return signature_header([("csnew000000001", NEW), ("csold000000001", OLD)], timestamp, BODY)


def test_the_header_names_each_signature_by_key_id():
    header = _rotating()
    new_digest, old_digest = sign(NEW, NOW, BODY)[3:], sign(OLD, NOW, BODY)[3:]
    assert header == f"kid=csnew000000001;v1={new_digest}, kid=csold000000001;v1={old_digest}"
    assert parse_signatures(header) == [("csnew000000001", new_digest), ("csold000000001", old_digest)]
    assert signature_header([(None, OLD)], NOW, BODY) == sign(OLD, NOW, BODY)  # unnamed: the header of before


def test_during_a_rotation_either_secret_alone_verifies():
    header = _rotating()
    for held in (OLD, NEW, OLD.decode(), {"csold000000001": OLD}, {"csnew000000001": NEW.decode()}):
        assert verify(held, BODY, str(NOW), header, now=NOW), held
    assert verify({"csold000000001": OLD, "csnew000000001": NEW}, BODY, str(NOW), header, now=NOW)


def test_another_secret_or_a_secret_under_another_key_id_fails():
    header = _rotating()
    assert not verify(OTHER, BODY, str(NOW), header, now=NOW)
    assert not verify({"csold000000001": OTHER}, BODY, str(NOW), header, now=NOW)
    # the right secret, but filed by the receiver under another key id: that signature is not checked with it
    assert not verify({"csnew000000001": OLD}, BODY, str(NOW), header, now=NOW)
    assert not verify({"csunknown00001": NEW}, BODY, str(NOW), header, now=NOW)


def test_unknown_key_ids_and_parameters_are_tolerated():
    digest = sign(NEW, NOW, BODY)[3:]
    header = f"kid=csfuture00001;v1={'0' * 64};v2=abc, kid=csnew000000001;v9=x;v1={digest}"
    assert verify({"csnew000000001": NEW, "csfuture00001": OTHER}, BODY, str(NOW), header, now=NOW)


def test_an_unnamed_signature_verifies_with_a_receivers_secrets_by_key_id():
    # ITEM_CALLBACK_SECRET signs unnamed: a receiver that filed it under any key id still accepts it
    header = signature_header([(None, OLD), ("csnew000000001", NEW)], NOW, BODY)
    assert verify({"env": OLD}, BODY, str(NOW), header, now=NOW)
    assert verify(NEW, BODY, str(NOW), header, now=NOW)
    assert not verify({"env": OTHER}, BODY, str(NOW), header, now=NOW)


@pytest.mark.parametrize(
    "header",
    [
        "kid=csnew000000001",  # no signature
        "kid=csnew000000001;v1={digest};kid=csold000000001",  # a parameter twice
        "kid=cs new;v1={digest}",  # a bad key id
        "kid=csnew000000001;v1={digest}x",
        "kid=csnew000000001;v1={upper}",
        "kid=csnew000000001 v1={digest}",
        "{digest}",
        ",".join(["v1=" + "0" * 64] * (MAX_SIGNATURES - 1) + ["kid=csnew000000001;v1={digest}"] * 2),  # too many
        "v1={digest}, " + " " * MAX_HEADER_CHARS,  # too long
    ],
)
def test_malformed_or_oversized_headers_fail(header):
    digest = sign(NEW, NOW, BODY)[3:]
    header = header.format(digest=digest, upper=digest.upper())
    assert not verify(NEW, BODY, str(NOW), header, now=NOW)
    assert not verify({"csnew000000001": NEW}, BODY, str(NOW), header, now=NOW)


def test_a_stale_timestamp_fails_with_key_ids_too():
    assert not verify(NEW, BODY, str(NOW), _rotating(), now=NOW + 301)


def test_a_key_id_the_header_cannot_carry_is_refused_when_signing():
    with pytest.raises(ValueError, match="Key id"):
        signature_header([("cs;v1=00", NEW)], NOW, BODY)


_HEADER_CHARS = st.sampled_from(string.printable + "=;,é\u0000\u2028１")
_PIECES = st.sampled_from(["kid=", "v1=", ";", ",", " ", "csnew000000001", sign(NEW, NOW, BODY), "0" * 64])


@settings(max_examples=400, deadline=None, database=None)
@given(
    header=st.one_of(st.text(_HEADER_CHARS, max_size=300), st.lists(_PIECES, max_size=20).map("".join), st.text()),
    timestamp=st.one_of(st.none(), st.text(max_size=14), st.just(str(NOW))),
)
def test_any_header_gives_true_or_false_never_an_exception(header, timestamp):
    parsed = parse_signatures(header)
    assert parsed is None or all(kid is None or isinstance(kid, str) for kid, _ in parsed)
    for held in (NEW, {"csnew000000001": NEW, "cs" + "0" * 12: OLD}):
        answer = verify(held, BODY, timestamp, header, now=NOW)
        assert answer is True or answer is False
        if answer:  # only a real signature of this body under a held secret can verify
            assert sign(NEW, NOW, BODY)[3:] in header or sign(OLD, NOW, BODY)[3:] in header
