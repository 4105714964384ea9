"""A tenant over its quota hears `429` with `Retry-After` over HTTP, and nothing is filed (real PostgreSQL)."""

from __future__ import annotations

import sqlalchemy as sa

from tests.web.conftest import image_b64
from worker.ledger import tenants
from worker.ledger.models import CheckRow
from worker.web.keys import create_key


def _key_of(served, tenant_id: str, **limits) -> dict[str, str]:
    with served.ledger.session() as session:
        tenants.create_tenant(session, tenant_id, tenants.TenantLimits(**limits))
    key = create_key(served.ledger, f"{tenant_id}-key", ["submit", "read"], tenant_id=tenant_id).key
    return {"Authorization": f"Bearer {key}"}


def _post(client, headers, external_id: str, seed: int):
    return client.post("/v1/checks", json={"external_id": external_id, "image": {"b64": image_b64(seed)}},
                       headers=headers)  # fmt: skip


def _filed(served, tenant_id: str) -> list[str]:
    with served.ledger.session() as session:
        return sorted(session.scalars(sa.select(CheckRow.external_id).where(CheckRow.tenant_id == tenant_id)))


def test_past_its_rate_a_tenant_gets_429_with_retry_after_and_nothing_is_filed(client, served):
    # given a tenant of one check every 100 s (a burst of one)
    headers = _key_of(served, "tiny", rate_per_s=0.01, burst=1)
    # when it submits twice
    first, second = _post(client, headers, "up-1", 1), _post(client, headers, "up-2", 2)
    # then the first is filed, the second refused with a typed error and when to try again
    assert first.status_code == 202, first.text
    assert second.status_code == 429, second.text
    assert second.json()["error"]["code"] == "quota.exceeded"
    assert 90 <= int(second.headers["Retry-After"]) <= 100
    assert _filed(served, "tiny") == ["up-1"]
    # and another tenant is not held back by it
    assert _post(client, served.headers("submit"), "up-2", 2).status_code == 202
    # and the refusal is counted under the tenant's label: seen by the tenant's own key and an operator's, not
    # by another tenant's
    operator = create_key(served.ledger, "operator", ["read"], tenant_id=None, all_tenants=True).key
    refused = 'item_quota_refused_total{reason="rate",tenant="tiny"}'
    assert refused in client.get("/metrics", headers={"Authorization": f"Bearer {operator}"}).text
    assert refused in client.get("/metrics", headers=headers).text
    assert refused not in client.get("/metrics", headers=served.headers("read")).text


def test_past_its_backlog_cap_a_tenant_gets_429_quota_backlog(client, served):
    headers = _key_of(served, "small", backlog_cap=1)
    assert _post(client, headers, "b-1", 1).status_code == 202
    refused = _post(client, headers, "b-2", 2)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "quota.backlog"
    assert refused.headers["Retry-After"] == str(served.settings.quota_backlog_retry_s)
    assert _filed(served, "small") == ["b-1"]


def test_the_submit_endpoint_documents_its_429(client):
    described = client.get("/openapi.json").json()["paths"]["/v1/checks"]["post"]["responses"]
    assert "429" in described and "Retry-After" in described["429"]["headers"]
