"""The key cache of `item serve`: presented key ids are the caller's choice, so made-up ones must not be able to
push the keys in use out of it (and send every real request back to the ledger)."""

from __future__ import annotations

import secrets
from collections import Counter

import pytest

from worker.ledger import access, migrate
from worker.ledger.store import Ledger
from worker.web import keys
from worker.web.keys import Authenticator, _Recent, create_key


@pytest.fixture
def ledger(tmp_path) -> Ledger:
    url = f"sqlite:///{tmp_path / 'ledger.sqlite3'}"
    migrate.upgrade(url)
    return Ledger(url)


@pytest.fixture
def asked(monkeypatch) -> Counter:
    """How often the ledger was asked for each key id."""
    counts: Counter = Counter()
    real = access.get_key

    def counted(session, key_id):
        counts[key_id] += 1
        return real(session, key_id)

    monkeypatch.setattr(access, "get_key", counted)
    monkeypatch.setattr(keys, "CACHE_S", 3600.0)  # the spray below must not outlast the cache's own expiry
    return counts


def _made_up() -> str:
    return f"item_k{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


def test_spraying_unknown_key_ids_never_evicts_a_key_in_use(ledger, asked):
    key = create_key(ledger, "platform", ["submit"])
    authenticator = Authenticator(ledger)
    assert authenticator.principal(key.key)[1] == "ok" and asked[key.key_id] == 1
    for _ in range(20_000):
        assert authenticator.principal(_made_up()) == (None, "unknown")
    who, outcome = authenticator.principal(key.key)
    assert outcome == "ok" and who.key_id == key.key_id
    assert asked[key.key_id] == 1  # still served from the cache
    assert sum(asked.values()) == 20_001  # every made-up id was asked for, once


def test_an_unknown_id_asked_again_is_answered_from_its_own_bounded_cache(ledger, asked, monkeypatch):
    monkeypatch.setattr(keys, "UNKNOWN_KEYS", 8)
    authenticator = Authenticator(ledger)
    wrong = _made_up()
    for _ in range(3):
        assert authenticator.principal(wrong) == (None, "unknown")
    assert sum(asked.values()) == 1
    for _ in range(100):
        authenticator.principal(_made_up())
    assert len(authenticator._unknown._entries) == 8


def test_a_revoked_key_is_refused_and_leaves_the_cache_of_keys_in_use(ledger, asked):
    key = create_key(ledger, "leaver", ["read"])
    authenticator = Authenticator(ledger)
    assert authenticator.principal(key.key)[1] == "ok"
    with ledger.session() as session:
        access.revoke_key(session, key.key_id)
    authenticator.forget(key.key_id)  # what the CACHE_S expiry does on its own
    assert authenticator.principal(key.key) == (None, "unknown")
    assert authenticator._known.get(key.key_id) is None and authenticator._unknown.get(key.key_id) is not None


def test_a_wrong_secret_for_a_real_id_is_refused_without_asking_again(ledger, asked):
    key = create_key(ledger, "platform", ["submit"])
    authenticator = Authenticator(ledger)
    forged = f"item_{key.key_id}_{secrets.token_urlsafe(32)}"
    assert authenticator.principal(forged) == (None, "unknown")
    assert authenticator.principal(key.key)[1] == "ok"
    assert asked[key.key_id] == 1


def test_the_cache_drops_the_least_recently_used_entry():
    recent = _Recent(2)
    recent.put("a", (1,))
    recent.put("b", (2,))
    assert recent.get("a") == (1,)  # used: now the most recent
    recent.put("c", (3,))
    assert recent.get("b") is None and recent.get("a") == (1,) and recent.get("c") == (3,)
