"""Schemathesis against the served OpenAPI description: generated requests (valid and not) never get a 5xx,
and every answer matches the description (status codes, content types, bodies, headers), but one check.

Driven through Hypothesis directly, operation by operation (schemathesis' pytest plugin does not run under
this pytest), with every one of schemathesis' checks.
"""

from __future__ import annotations

import json
from pathlib import Path

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import positive_data_acceptance

EXAMPLES = 40  # per operation: about 10 s in all on two cores


def test_the_api_keeps_to_its_description(client, served):
    schema = schemathesis.openapi.from_asgi("/openapi.json", client.app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/checks", "/v1/checks/{check_id}", "/v1/versions", "/readyz"}
    for operation in operations:
        _fuzz(operation, served.headers("admin"))


def _fuzz(operation, headers: dict) -> None:
    @given(case=operation.as_strategy())
    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    def calls(case):
        # an admin key: every operation is reached past authentication, where the interesting answers are
        # Every check but "schema-valid data is accepted": a body can fit the description and still name an image
        # that is not one (bad base64, a callback URL without a scheme), which the task contract answers with a
        # rejected check and its code (422), as it does for a Celery message.
        case.call_and_validate(headers=headers, excluded_checks=[positive_data_acceptance])

    calls()


def test_the_description_declares_bearer_keys(client):
    described = client.get("/openapi.json").json()
    assert "HTTPBearer" in described["components"]["securitySchemes"]
    secured = described["paths"]["/v1/checks"]["post"]["security"]
    assert secured == [{"HTTPBearer": []}]


def test_the_description_in_docs_is_the_served_one(client):
    checked_in = json.loads((Path(__file__).parents[2] / "docs" / "openapi.json").read_text())
    assert checked_in == client.get("/openapi.json").json(), "run: python -m worker.web.openapi > docs/openapi.json"
