"""A callback secret per tenant, with rotation, on a real ledger (both databases) and a real HTTP receiver.

Each tenant's callbacks are signed with its own secrets only; during a rotation they carry two signatures, each
naming its key id, and either secret alone verifies them; once the window ends only the new one signs. The default
tenant keeps ITEM_CALLBACK_SECRET's header of before tenants. `item secrets` shows a secret once, and only then.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from tests.integration.test_delivery import Receiver
from worker.cli.main import app
from worker.ledger import callback_secrets as cs
from worker.ledger.models import DEFAULT_TENANT, CallbackSecretRow, DeliveryRow, PipelineVersionRow, TenantRow
from worker.ledger.outbox import record_outcome
from worker.ledger.store import Ledger
from worker.ledger.tenants import create_tenant
from worker.outbox.delivery import Deliverer
from worker.outbox.signing import parse_signatures, verify
from worker.settings import Settings

ENV_SECRET = "the-default-tenants-env-secret"
VERSION = "v-secrets"
SETTINGS = {
    "database_url": "sqlite://",  # unused: the deliverer is given the test's ledger
    "callback_allowed_networks": ["127.0.0.1/32"],
    "callback_timeout_s": 2,
    "delivery_backoff_s": 0.001,
    "delivery_backoff_max_s": 0.002,
}


@pytest.fixture
def tenants(ledger) -> Ledger:
    """The test's ledger with tenants a, b and c besides the default, and no callback secrets."""
    with ledger.session() as session:
        session.execute(sa.delete(CallbackSecretRow))
        session.execute(sa.delete(TenantRow).where(TenantRow.id != DEFAULT_TENANT))
        session.add(PipelineVersionRow(id=VERSION, profile="tiny", caption="c", ground="g", embed="e", head="h"))
        for tenant in ("a", "b", "c"):
            create_tenant(session, tenant)
    return ledger


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    made = Receiver((200,))
    yield made
    made.close()


def _deliverer(ledger: Ledger, env_secret: str | None = None) -> Deliverer:
    return Deliverer(Settings(**SETTINGS, callback_secret=env_secret), ledger)


def _ended(ledger: Ledger, tenant: str, url: str, external_id: str) -> str:
    """A check of `tenant` ended (rejected) with its callback queued, as the intake or a worker ends one."""
    with ledger.session() as session:
        check, _ = ledger.create_check(
            session,
            external_id=external_id,
            pipeline_version_id=VERSION,
            source={"url": "http://example.com/x.png"},
            callback_url=url,
            tenant_id=tenant,
        )
        record_outcome(session, ledger.finish_rejected(session, check.id, "url.http_4xx", "gone"), results_stream=False)
    return check.id


def _send(ledger: Ledger, deliverer: Deliverer, receiver: Receiver, tenant: str, external_id: str):
    """Sends one callback of `tenant`; returns (delivery row, the request, its timestamp and signature headers)."""
    check_id = _ended(ledger, tenant, receiver.url, external_id)
    before = len(receiver.requests)
    assert deliverer.deliver_due() == 1
    with ledger.session() as session:
        delivery = session.scalars(sa.select(DeliveryRow).where(DeliveryRow.check_id == check_id)).one()
    if delivery.status != "delivered":
        return delivery, None, None, None
    request = receiver.wait_for(before + 1)[before]
    return delivery, request, request.headers["X-Item-Timestamp"], request.headers["X-Item-Signature"]


def _make(ledger: Ledger, tenant: str, rotate_window_s: float | None = None) -> cs.MadeSecret:
    with ledger.session() as session:
        if rotate_window_s is None:
            return cs.create_secret(session, tenant)
        return cs.rotate_secret(session, tenant, rotate_window_s)


def test_each_tenant_signs_with_its_own_secret_only(tenants, receiver):
    ledger = tenants
    a, b = _make(ledger, "a"), _make(ledger, "b")
    deliverer = _deliverer(ledger, ENV_SECRET)

    delivery, request, timestamp, signature = _send(ledger, deliverer, receiver, "a", "a-1")
    assert delivery.tenant_id == "a" and delivery.status == "delivered"
    assert [kid for kid, _ in parse_signatures(signature)] == [a.key_id]  # never the env secret, never b's
    assert verify(a.secret, request.body, timestamp, signature)
    assert verify({a.key_id: a.secret}, request.body, timestamp, signature)
    assert not verify(b.secret, request.body, timestamp, signature)
    assert not verify({a.key_id: b.secret, b.key_id: b.secret}, request.body, timestamp, signature)
    assert not verify(ENV_SECRET, request.body, timestamp, signature)

    # a tenant without a secret: its callback is never sent, and says why
    delivery, request, _, _ = _send(ledger, deliverer, receiver, "c", "c-1")
    assert request is None and delivery.status == "failed" and delivery.tenant_id == "c"
    assert (
        delivery.last_error.startswith("callback.no_secret: ")
        and "item secrets create --tenant c" in delivery.last_error
    )
    assert len(receiver.requests) == 1


def test_the_default_tenant_keeps_the_env_secret_header_and_adds_its_own(tenants, receiver):
    ledger = tenants
    deliverer = _deliverer(ledger, ENV_SECRET)
    _, request, timestamp, signature = _send(ledger, deliverer, receiver, DEFAULT_TENANT, "d-1")
    assert signature.startswith("v1=") and "," not in signature and "kid" not in signature  # exactly as before
    assert verify(ENV_SECRET, request.body, timestamp, signature)

    # a ledger secret of the default tenant signs beside ITEM_CALLBACK_SECRET until the setting is removed
    made = _make(ledger, DEFAULT_TENANT)
    deliverer._secrets.forget()  # else seen within delivery.SECRETS_CACHE_S
    _, request, timestamp, signature = _send(ledger, deliverer, receiver, DEFAULT_TENANT, "d-2")
    assert [kid for kid, _ in parse_signatures(signature)] == [None, made.key_id]
    assert verify(ENV_SECRET, request.body, timestamp, signature)
    assert verify({made.key_id: made.secret}, request.body, timestamp, signature)
    _, request, timestamp, signature = _send(ledger, _deliverer(ledger), receiver, DEFAULT_TENANT, "d-3")
    assert [kid for kid, _ in parse_signatures(signature)] == [made.key_id]
    assert not verify(ENV_SECRET, request.body, timestamp, signature)


def test_a_rotation_signs_with_both_until_its_window_ends(tenants, receiver):
    ledger = tenants
    old = _make(ledger, "a")
    new = _make(ledger, "a", rotate_window_s=0.6)
    assert new.retiring == (old.key_id,) and new.key_id != old.key_id
    deliverer = _deliverer(ledger)

    _, request, timestamp, signature = _send(ledger, deliverer, receiver, "a", "a-1")
    assert [kid for kid, _ in parse_signatures(signature)] == [new.key_id, old.key_id]
    for held in (old.secret, new.secret, {old.key_id: old.secret}, {new.key_id: new.secret}):
        assert verify(held, request.body, timestamp, signature)

    time.sleep(max(0.0, (new.retires_at - cs.utcnow()).total_seconds()) + 0.05)  # the window ends
    _, request, timestamp, signature = _send(ledger, deliverer, receiver, "a", "a-2")  # from the cache, too
    assert [kid for kid, _ in parse_signatures(signature)] == [new.key_id]
    assert verify(new.secret, request.body, timestamp, signature)
    assert not verify(old.secret, request.body, timestamp, signature)
    assert not verify({old.key_id: old.secret}, request.body, timestamp, signature)

    with ledger.session() as session:
        states = {row.key_id: cs.state(row) for row in cs.list_secrets(session, "a")}
        assert states == {new.key_id: "current", old.key_id: "retired"}
        assert cs.purge_retired(session) == 1
        assert [row.key_id for row in cs.list_secrets(session)] == [new.key_id]


def test_a_new_or_rotated_secret_reaches_a_running_deliverer_within_its_cache_time(tenants, receiver):
    ledger = tenants
    _make(ledger, "b")
    deliverer = _deliverer(ledger)
    deliverer._secrets.cache_s = 0.3  # delivery.SECRETS_CACHE_S, shortened
    _send(ledger, deliverer, receiver, "b", "b-1")  # the deliverer has read the secrets: a has none yet
    old = _make(ledger, "a")
    delivery, _, _, signature = _send(ledger, deliverer, receiver, "a", "a-1")  # none cached: read again at once
    assert delivery.status == "delivered" and [kid for kid, _ in parse_signatures(signature)] == [old.key_id]

    new = _make(ledger, "a", rotate_window_s=0)
    with ledger.session() as session:  # retired at once, and listed until the next rotation or purge
        assert {row.key_id: cs.state(row) for row in cs.list_secrets(session, "a")} == {
            new.key_id: "current",
            old.key_id: "retired",
        }
    _, _, _, signature = _send(ledger, deliverer, receiver, "a", "a-2")  # within the cache time: still the old
    assert [kid for kid, _ in parse_signatures(signature)] == [old.key_id]
    time.sleep(0.35)
    _, request, timestamp, signature = _send(ledger, deliverer, receiver, "a", "a-3")
    assert [kid for kid, _ in parse_signatures(signature)] == [new.key_id]
    assert not verify(old.secret, request.body, timestamp, signature)
    newest = _make(ledger, "a", rotate_window_s=60)  # a rotation deletes what retired before it
    with ledger.session() as session:
        assert [row.key_id for row in cs.list_secrets(session, "a")] == [newest.key_id, new.key_id]


def test_retiring_stops_a_retiring_secret_but_refuses_the_current_one(tenants, receiver):
    ledger = tenants
    old = _make(ledger, "a")
    new = _make(ledger, "a", rotate_window_s=3600)
    with ledger.session() as session:
        with pytest.raises(cs.CurrentCallbackSecret, match="--window 0"):
            cs.retire_secret(session, "a", new.key_id)
        with pytest.raises(cs.UnknownCallbackSecret):
            cs.retire_secret(session, "b", old.key_id)  # another tenant's
        with pytest.raises(cs.CallbackSecretExists):
            cs.create_secret(session, "a")
        with pytest.raises(cs.NoCallbackSecret):
            cs.rotate_secret(session, "b", 60)
        assert cs.state(cs.retire_secret(session, "a", old.key_id)) == "retired"
    deliverer = _deliverer(ledger)
    _, request, timestamp, signature = _send(ledger, deliverer, receiver, "a", "a-1")
    assert [kid for kid, _ in parse_signatures(signature)] == [new.key_id]


def test_item_secrets_shows_a_secret_once_and_only_then(tenants):
    ledger = tenants
    env = {"ITEM_DATABASE_URL": ledger.engine.url.render_as_string(hide_password=False), "COLUMNS": "200"}
    runner = CliRunner()

    def item(*args: str):
        return runner.invoke(app, ["secrets", *args], env=env)

    created = item("create", "--tenant", "a", "--json")
    assert created.exit_code == 0, created.output
    first = json.loads(created.stdout)
    assert first["key_id"].startswith("cs") and len(first["key_id"]) == 14 and len(first["secret"]) >= 43

    rotated = item("rotate", "--tenant", "a", "--window", "1d")
    assert rotated.exit_code == 0, rotated.output
    second = rotated.stdout.strip()  # the secret alone on stdout, the words on stderr
    assert first["key_id"] in rotated.stderr and "shown only this once" in rotated.stderr

    listed = item("list", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert {(row["key_id"], row["state"]) for row in rows} >= {(first["key_id"], "retiring")}
    table = item("list", "--tenant", "a")
    for shown in (listed.stdout, table.stdout, table.stderr):
        assert first["secret"] not in shown and second not in shown
    assert first["key_id"] in table.stdout

    current = next(row["key_id"] for row in rows if row["state"] == "current")
    refused = item("retire", "--tenant", "a", current)
    assert refused.exit_code == 2 and "callback_secret.current" in refused.stderr
    assert item("retire", "--tenant", "a", first["key_id"]).exit_code == 0
    assert json.loads(item("purge", "--json").stdout) == {"purged": 1}
    for args, code in (
        (("create", "--tenant", "a"), "callback_secret.exists"),
        (("create", "--tenant", "nobody"), "tenant.unknown"),
        (("rotate", "--tenant", "a", "--window", "soon"), "callback_secret.invalid"),
        (("rotate", "--tenant", "a", "--window", "365d"), "callback_secret.invalid"),
    ):
        result = item(*args)
        assert result.exit_code == 2 and code in result.stderr, (args, result.output)


def test_a_tenant_without_a_secret_costs_one_read_a_second_not_one_per_callback(tenants):
    from sqlalchemy import event

    from worker.outbox.delivery import SigningSecrets

    secrets = SigningSecrets(Settings(database_url="sqlite://"), tenants)
    reads = []

    def record(_connection, _cursor, statement, *_args) -> None:
        reads.append(statement)

    event.listen(tenants.engine, "before_cursor_execute", record)
    try:
        assert all(secrets.signing("b") == [] for _ in range(50))  # b has no secret: every callback asks
    finally:
        event.remove(tenants.engine, "before_cursor_execute", record)
    assert 1 <= sum("callback_secrets" in statement for statement in reads) <= 2
