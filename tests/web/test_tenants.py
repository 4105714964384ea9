"""Tenants at every entry point: a key files and reads its own tenant's checks only, another tenant's check reads
exactly as a missing one, an operator key (of all tenants) is explicit, reads across them and names the tenant it
files for. The API and console in this process against real PostgreSQL; the command line as a person runs it."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.web.conftest import ITEM, image_b64
from worker.ledger import tenants
from worker.web.keys import create_key

MISSING = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def two(served):
    """Tenants a and b, each with a key of every scope it needs, and an operator key of all tenants."""
    with served.ledger.session() as session:
        for tenant_id in ("a", "b"):
            tenants.create_tenant(session, tenant_id)
    keys = {
        tenant_id: create_key(served.ledger, f"{tenant_id}-key", ["submit", "read", "review"], tenant_id=tenant_id).key
        for tenant_id in ("a", "b")
    }
    keys["operator"] = create_key(
        served.ledger, "operator", ["submit", "read", "review"], tenant_id=None, all_tenants=True
    ).key
    return {name: {"Authorization": f"Bearer {key}"} for name, key in keys.items()}


def _submit(client, headers, external_id: str, seed: int, **extra) -> dict:
    answer = client.post("/v1/checks", json={"external_id": external_id, "image": {"b64": image_b64(seed)}, **extra},
                         headers=headers)  # fmt: skip
    assert answer.status_code == 202, answer.text
    return answer.json()


def test_another_tenants_check_reads_exactly_as_a_missing_one(client, served, two):
    # given a check of tenant a, run by a worker
    mine = _submit(client, two["a"], "upload-1", 1)
    assert mine["tenant"] == "a"
    served.run_checks()
    # when tenant b's key asks for it, every way: the same answer as for an id that exists nowhere
    for suffix, method, body in (("", "get", None), ("/decisions", "get", None),
                                 ("/decisions", "post", {"label": "authentic"})):  # fmt: skip
        theirs = client.request(method, f"/v1/checks/{mine['id']}{suffix}", json=body, headers=two["b"])
        missing = client.request(method, f"/v1/checks/{MISSING}{suffix}", json=body, headers=two["b"])
        assert theirs.status_code == missing.status_code == 404
        assert theirs.json() == missing.json() and theirs.json()["error"]["code"] == "check.not_found"
    # and b's list never holds it, whatever b asks for
    for query in ("", "?tenant=a", "?external_id=upload-1"):
        assert client.get(f"/v1/checks{query}", headers=two["b"]).json()["items"] == []
    # then its own tenant reads it, and decides on it
    assert client.get(f"/v1/checks/{mine['id']}", headers=two["a"]).json()["status"] == "done"
    decided = client.post(f"/v1/checks/{mine['id']}/decisions", json={"label": "authentic"}, headers=two["a"])
    assert decided.status_code == 201
    assert [row["label"] for row in client.get(f"/v1/checks/{mine['id']}/decisions", headers=two["a"]).json()] == [
        "authentic"
    ]


def test_the_same_external_id_under_two_tenants_is_two_checks(client, served, two):
    a = _submit(client, two["a"], "shared-id", 2)
    b = _submit(client, two["b"], "shared-id", 3)  # another image: no conflict, another tenant's id
    assert a["id"] != b["id"] and (a["tenant"], b["tenant"]) == ("a", "b")
    assert served.run_checks() == 2
    read_a = client.get(f"/v1/checks/{a['id']}", headers=two["a"]).json()
    read_b = client.get(f"/v1/checks/{b['id']}", headers=two["b"]).json()
    assert read_a["image_sha256"] != read_b["image_sha256"] and read_a["status"] == read_b["status"] == "done"
    # each tenant's list by that external id holds its own check only
    by_id = {name: client.get("/v1/checks?external_id=shared-id", headers=two[name]).json()["items"] for name in "ab"}
    assert [row["id"] for row in by_id["a"]] == [a["id"]] and [row["id"] for row in by_id["b"]] == [b["id"]]


def test_an_operator_key_reads_every_tenant_filters_and_must_name_whom_it_files_for(client, served, two):
    a = _submit(client, two["a"], "from-a", 4)
    # an operator key files only for a tenant it names; a tenant's key only for its own
    refused = client.post("/v1/checks", json={"external_id": "x", "image": {"b64": image_b64(5)}},
                          headers=two["operator"])  # fmt: skip
    assert refused.status_code == 422 and refused.json()["error"]["code"] == "tenant.required"
    unknown = client.post("/v1/checks", json={"external_id": "x", "image": {"b64": image_b64(5)}, "tenant": "zz"},
                          headers=two["operator"])  # fmt: skip
    assert unknown.status_code == 422 and unknown.json()["error"]["code"] == "tenant.unknown"
    forged = client.post("/v1/checks", json={"external_id": "x", "image": {"b64": image_b64(5)}, "tenant": "b"},
                         headers=two["a"])  # fmt: skip
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "tenant.forbidden"
    b = _submit(client, two["operator"], "for-b", 6, tenant="b")
    assert b["tenant"] == "b"
    # it reads both, and narrows to one with ?tenant=
    everything = {row["id"]: row["tenant"] for row in client.get("/v1/checks", headers=two["operator"]).json()["items"]}
    assert everything == {a["id"]: "a", b["id"]: "b"}
    only_b = client.get("/v1/checks?tenant=b", headers=two["operator"]).json()["items"]
    assert [row["id"] for row in only_b] == [b["id"]]
    assert client.get(f"/v1/checks/{a['id']}", headers=two["operator"]).status_code == 200
    assert client.get(f"/v1/checks/{b['id']}", headers=two["b"]).status_code == 200  # b's own, filed for it
    # /metrics: the operator sees every tenant's samples, a tenant's key its own only
    scraped = {name: client.get("/metrics", headers=two[name]).text for name in ("operator", "a")}
    assert 'tenant="a"' in scraped["operator"] and 'tenant="b"' in scraped["operator"]
    assert 'tenant="a"' in scraped["a"] and 'tenant="b"' not in scraped["a"]
    # a tenant pinned to a version sees it so in the versions list
    with served.ledger.session() as session:
        tenants.pin_version(session, "b", served.service.version_id)
    pinned = {
        name: [v["id"] for v in client.get("/v1/versions", headers=two[name]).json() if v["pinned"]] for name in "ab"
    }
    assert pinned == {"a": [], "b": [served.service.version_id]}


def _console(client, headers) -> None:
    """Signs `client` in to the console with the key of `headers`."""
    key = headers["Authorization"].removeprefix("Bearer ")
    form = client.get("/console/signin")
    csrf = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    signed = client.post("/console/signin", data={"key": key, "csrf": csrf, "next": "/console"})
    assert signed.status_code == 303 and signed.headers["location"] == "/console"


def test_the_console_shows_another_tenants_check_image_and_thumbnail_to_nobody_but_its_own(client, served, two):
    # given the same bytes sent by both tenants (shared by sha256), each a check of its own
    a = _submit(client, two["a"], "same-bytes", 7)
    b = _submit(client, two["b"], "same-bytes", 7)
    served.run_checks()
    _console(client, two["b"])
    # b's moderator opens its own check, image and thumbnail...
    for suffix in ("", "/image", "/thumbnail"):
        assert client.get(f"/console/checks/{b['id']}{suffix}").status_code == 200, suffix
    # ...but a's is not found, as a missing one is, and cannot be decided on
    for suffix in ("", "/image", "/thumbnail"):
        assert client.get(f"/console/checks/{a['id']}{suffix}").status_code == 404, suffix
    csrf = client.get(f"/console/checks/{b['id']}").text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    decided = client.post(f"/console/checks/{a['id']}/decision", data={"label": "authentic", "csrf": csrf})
    assert decided.status_code == 404
    queue = client.get("/console?verdict=any&tenant=a").text  # asking for a's changes nothing
    assert b["id"] in queue and a["id"] not in queue and 'name="tenant"' not in queue
    # an operator sees both, with their tenant, and narrows to one
    client.cookies.clear()
    _console(client, two["operator"])
    queue = client.get("/console?verdict=any").text
    assert a["id"] in queue and b["id"] in queue and 'name="tenant"' in queue
    only_a = client.get("/console?verdict=any&tenant=a").text
    assert a["id"] in only_a and b["id"] not in only_a
    assert client.get(f"/console/checks/{a['id']}/thumbnail").status_code == 200
    assert client.get("/console/operations?tenant=b").status_code == 200


def test_activating_a_version_in_the_console_takes_an_operator_key(client, served, two):
    admin_of_a = create_key(served.ledger, "a-admin", ["admin"], tenant_id="a").key
    _console(client, {"Authorization": f"Bearer {admin_of_a}"})
    version = served.service.version_id
    assert client.get(f"/console/versions/{version}/activate").status_code == 403
    assert f"/console/versions/{version}/activate" not in client.get("/console/operations").text


def _item(served, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ITEM_DATABASE_URL": served.settings.database_url, "COLUMNS": "200"}
    return subprocess.run([ITEM, *args], env=env, capture_output=True, text=True, timeout=60)


def test_tenants_and_their_keys_from_the_command_line(served, client):
    made = _item(served, "tenants", "create", "shop", "--name", "A shop", "--weight", "3", "--rate", "5", "--json")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout) | {"created_at": None} == {
        "id": "shop", "name": "A shop", "weight": 3, "rate_per_s": 5.0, "burst": None, "backlog_cap": None,
        "pipeline_version_id": None, "created_at": None, "disabled_at": None,
    }  # fmt: skip
    assert _item(served, "tenants", "create", "shop").returncode == 2  # never made twice
    changed = _item(served, "tenants", "set", "shop", "--no-rate", "--backlog-cap", "10", "--json")
    assert (json.loads(changed.stdout)["rate_per_s"], json.loads(changed.stdout)["backlog_cap"]) == (None, 10)
    listed = [json.loads(line) for line in _item(served, "tenants", "list", "--json").stdout.splitlines()]
    assert [row["id"] for row in listed] == ["default", "shop"]
    # keys: one tenant's, an explicit operator key, never both, never an unknown tenant
    key = json.loads(
        _item(served, "keys", "create", "--scope", "read", "--name", "s", "--tenant", "shop", "--json").stdout
    )
    operator = _item(served, "keys", "create", "--scope", "read", "--name", "o", "--all-tenants", "--json")
    assert key["tenant"] == "shop" and json.loads(operator.stdout)["tenant"] is None
    for wrong in (("--tenant", "nope"), ("--tenant", "shop", "--all-tenants")):
        assert _item(served, "keys", "create", "--scope", "read", "--name", "x", *wrong).returncode == 2, wrong
    keys = {
        row["name"]: row["tenant"]
        for row in map(json.loads, _item(served, "keys", "list", "--json").stdout.splitlines())
    }
    assert keys["s"] == "shop" and keys["o"] is None and keys["test-read"] == "default"
    # the key reads its tenant's (none yet), not default's
    _submit(client, served.headers("submit"), "of-default", 8)
    assert client.get("/v1/checks", headers={"Authorization": f"Bearer {key['key']}"}).json()["items"] == []
    # the command line narrows its reads with --tenant
    assert len(_item(served, "results", "--json").stdout.splitlines()) == 1
    assert _item(served, "results", "--tenant", "shop", "--json").stdout == ""
    assert json.loads(_item(served, "status", "--tenant", "shop", "--json").stdout)["queued"] == 0
    # pinning to an unknown version is refused; disabling refuses new checks
    assert _item(served, "tenants", "pin", "shop", "v-nope").returncode == 2
    assert json.loads(_item(served, "tenants", "disable", "shop", "--json").stdout)["disabled_at"] is not None


HOSTILE_TENANTS = st.one_of(
    st.text(max_size=80),
    st.sampled_from(["A B", "../a", "a/../b", "a" * 64, "all", "", "\x00", "a\x00", "é", "a;drop", "%00", " a"]),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tenant=HOSTILE_TENANTS)
def test_any_tenant_a_caller_names_is_a_tenant_or_a_typed_refusal_never_a_server_error(client, served, two, tenant):
    """Whatever an operator names as a tenant, in a body, a query or a form, the answer is a tenant's (or every
    tenant's) or a typed 4xx: never a 5xx, never a database error (a NUL, say) reaching a query."""
    body = {"external_id": "named", "image": {"b64": image_b64(1)}, "tenant": tenant}
    filed = client.post("/v1/checks", json=body, headers=two["operator"])
    assert filed.status_code in (202, 200, 403, 422), filed.text
    listed = client.get("/v1/checks", params={"tenant": tenant}, headers=two["operator"])
    assert listed.status_code in (200, 422), listed.text
    _console(client, two["operator"])
    for page in ("/console", "/console/operations", "/console/review"):
        answer = client.get(page, params={"tenant": tenant})
        assert answer.status_code in (200, 422), (page, answer.status_code)
    csrf = client.get("/console/review").text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    skipped = client.post(
        f"/console/review/{MISSING}/skip", data={"token": "x", "csrf": csrf, "tenant": tenant}, follow_redirects=False
    )
    assert skipped.status_code in (303, 422), skipped.status_code
