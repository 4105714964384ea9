"""ITEM's bank as HMA's PDQ signal: `GET /v1/bank` over real, decided checks, then `ItemBankExchange` against a
running `item serve`, its hashes in threatexchange's own PDQ index, queried with a re-encoded copy."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from pipeline.core.pdq import from_hex, pdq_of, to_hex
from tests.conftest import noise_image
from tests.web.conftest import image_b64
from worker.ledger import reviews, tenants
from worker.web.keys import create_key

pytest.importorskip("threatexchange.exchanges.signal_exchange_api")  # the `hma` extra
from threatexchange.exchanges.auth import SignalExchangeAPIMissingAuthException  # noqa: E402
from threatexchange.exchanges.fetch_state import SignalOpinionCategory  # noqa: E402
from threatexchange.signal_type.pdq.signal import PdqSignal  # noqa: E402

from worker.hma import ItemBankCollabConfig, ItemBankExchange  # noqa: E402

DECIDED = {1: "ai_generated", 2: "authentic", 3: "ai_generated"}  # image seed: the moderator's call


def _decided_checks(served, client) -> dict[int, str]:
    """A done check per seed of DECIDED, filed through the API and run by the worker code, then decided as
    DECIDED says. Returns seed: check id."""
    ids = {}
    for seed in DECIDED:
        body = {"external_id": f"bank-{seed}", "image": {"b64": image_b64(seed)}}
        ids[seed] = client.post("/v1/checks", json=body, headers=served.headers("submit")).json()["id"]
    served.run_checks()
    with served.ledger.session() as session:
        for seed, check_id in ids.items():
            assert served.ledger.get_check(session, check_id).status == "done"
            reviews.record_decision(session, check_id, DECIDED[seed], "moderator", None)
    return ids


def test_the_bank_pages_by_id_within_the_tenant(served, client):
    ids = _decided_checks(served, client)
    read = served.headers("read")
    whole = client.get("/v1/bank", headers=read).json()
    assert [entry["check_id"] for entry in whole["entries"]] == [ids[1], ids[2], ids[3]]
    assert [entry["label"] for entry in whole["entries"]] == ["fake", "real", "fake"]
    assert whole["next_after_id"] == whole["entries"][-1]["id"]
    with served.ledger.session() as session:
        image = served.ledger.get_check(session, ids[1])
        stored = reviews.decisions_of(session, ids[1])[0]
    first = whole["entries"][0]
    assert first["decision_id"] == stored.id and len(first["pdq"]) == 64
    expected = pdq_of(Image.open(io.BytesIO(base64.b64decode(image_b64(1)))))[0]
    assert image.image_sha256 and from_hex(first["pdq"]) == expected

    page = client.get("/v1/bank?limit=2", headers=read).json()
    assert [entry["id"] for entry in page["entries"]] == [entry["id"] for entry in whole["entries"][:2]]
    rest = client.get(f"/v1/bank?after_id={page['next_after_id']}&limit=2", headers=read).json()
    assert rest["entries"] == whole["entries"][2:]
    done = client.get(f"/v1/bank?after_id={rest['next_after_id']}", headers=read).json()
    assert done == {"entries": [], "next_after_id": None}


def test_another_tenant_sees_none_and_read_scope_is_needed(served, client):
    _decided_checks(served, client)
    with served.ledger.session() as session:
        tenants.create_tenant(session, "other")
    other = create_key(served.ledger, "other-reader", ["read"], tenant_id="other").key
    answer = client.get("/v1/bank", headers={"Authorization": f"Bearer {other}"})
    assert answer.json() == {"entries": [], "next_after_id": None}
    refused = client.get("/v1/bank", headers=served.headers("submit"))
    assert (refused.status_code, refused.json()["error"]["code"]) == (403, "auth.scope")
    operator = create_key(served.ledger, "operator", ["read"], tenant_id=None, all_tenants=True).key
    as_operator = {"Authorization": f"Bearer {operator}"}
    assert len(client.get("/v1/bank", headers=as_operator).json()["entries"]) == 3
    assert client.get("/v1/bank?tenant=other", headers=as_operator).json()["entries"] == []
    for bad in ("limit=0", "limit=1001", "after_id=-1", "limit=x"):
        invalid = client.get(f"/v1/bank?{bad}", headers=served.headers("read"))
        assert invalid.status_code == 422 and invalid.json()["error"]["code"], bad


def test_hma_matches_a_re_encoded_copy_with_the_decision_that_banked_it(served, client, server):
    ids = _decided_checks(served, client)
    base, _ = server
    collab = ItemBankCollabConfig(name="item", api=ItemBankExchange.get_name(), api_url=base, page_size=2)
    exchange = ItemBankExchange(collab, served.keys["read"])
    deltas = list(exchange.fetch_iter([PdqSignal], None))
    assert len(deltas) == 2 and deltas[-1].checkpoint.after_id > deltas[0].checkpoint.after_id
    assert not deltas[-1].checkpoint.is_stale()
    fetched: dict = {}
    for delta in deltas:
        ItemBankExchange.naive_fetch_merge(fetched, delta.updates)
    assert len(fetched) == 3  # the `real` one is a record too, with the opinion "false positive"
    real = next(record for record in fetched.values() if record.label == "real")
    assert real.get_as_aggregate_opinion().category == SignalOpinionCategory.NEGATIVE_CLASS
    # up to date: fetching again from the checkpoint brings nothing new
    again = list(exchange.fetch_iter([PdqSignal], deltas[-1].checkpoint))
    assert [delta.updates for delta in again] == [{}]

    signals = ItemBankExchange.naive_convert_to_signal_type([PdqSignal], collab, fetched)[PdqSignal]
    assert {record.check_id for record in signals.values()} == {ids[1], ids[3]}  # the authentic one never matches
    index = PdqSignal.get_index_cls().build(signals.items())
    matches = index.query(to_hex(pdq_of(_jpeg_copy(image_b64(1)))[0]))
    assert [match.metadata.check_id for match in matches] == [ids[1]]
    with served.ledger.session() as session:
        decision = reviews.decisions_of(session, ids[1])[0]
    assert (matches[0].metadata.label, matches[0].metadata.decision_id) == ("fake", decision.id)
    assert index.query(to_hex(pdq_of(_jpeg_copy(image_b64(2)))[0])) == []  # decided authentic: not indexed
    assert index.query(to_hex(pdq_of(noise_image(40, 96, 72))[0])) == []  # unrelated


def test_hma_configures_it_from_the_environment(monkeypatch):
    collab = ItemBankCollabConfig(name="item", api=ItemBankExchange.get_name())
    monkeypatch.delenv("ITEM_HMA_API_URL", raising=False)
    monkeypatch.delenv("ITEM_HMA_API_KEY", raising=False)
    with pytest.raises(SignalExchangeAPIMissingAuthException) as missing:
        ItemBankExchange.for_collab(collab)
    assert "ITEM_HMA_API_URL" in missing.value.pretty_str()
    monkeypatch.setenv("ITEM_HMA_API_URL", "http://item.example/")
    monkeypatch.setenv("ITEM_HMA_API_KEY", "k")
    exchange = ItemBankExchange.for_collab(collab)
    assert (exchange.api_url, exchange.api_key) == ("http://item.example", "k")


def _jpeg_copy(b64: str) -> Image.Image:
    """The image re-encoded as a JPEG, as a platform would serve a copy of it."""
    out = io.BytesIO()
    Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB").save(out, "JPEG", quality=80)
    return Image.open(io.BytesIO(out.getvalue()))
