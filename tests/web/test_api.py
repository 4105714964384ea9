"""The HTTP API against real PostgreSQL: the intake's idempotency and codes, pages, keys and scopes."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from tests.web.conftest import image_b64
from worker.ledger import access
from worker.ledger.models import utcnow
from worker.ops import metrics
from worker.web.app import body_limit

# (method, path, body, the scope it needs)
ENDPOINTS = [
    ("post", "/v1/checks", {"external_id": "scoped", "image": {"url": "https://example.com/a.png"}}, "submit"),
    ("get", "/v1/checks", None, "read"),
    ("get", "/v1/checks/00000000-0000-0000-0000-000000000000", None, "read"),
    ("post", "/v1/checks/00000000-0000-0000-0000-000000000000/decisions", {"label": "unsure"}, "review"),
    ("get", "/v1/checks/00000000-0000-0000-0000-000000000000/decisions", None, "read"),
    ("get", "/v1/versions", None, "read"),
    ("get", "/metrics", None, "read"),
]


def _call(client, method, path, body=None, headers=None):
    return client.request(method, path, json=body, headers=headers or {})


def _failures(reason: str) -> float:
    return metrics.AUTH_FAILURES.labels(reason)._value.get()


@pytest.mark.parametrize(("method", "path", "body", "scope"), ENDPOINTS)
def test_every_endpoint_needs_a_key_with_its_scope(client, served, method, path, body, scope):
    # given no key, a malformed one and an unknown one: 401, each counted by reason
    before = {reason: _failures(reason) for reason in ("missing", "malformed", "unknown", "scope")}
    assert _call(client, method, path, body).status_code == 401
    assert _call(client, method, path, body, {"Authorization": "Bearer nope"}).status_code == 401
    forged = served.keys["read"][:-4] + "AAAA"
    refused = _call(client, method, path, body, {"Authorization": f"Bearer {forged}"})
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "auth.unknown"
    assert refused.headers["www-authenticate"].startswith("Bearer")
    # then a key of each other scope is 403; its own scope and admin pass
    for other in ("submit", "read", "review", "admin"):
        answer = _call(client, method, path, body, served.headers(other))
        if other in (scope, "admin"):
            assert answer.status_code not in (401, 403), answer.text
        else:
            assert answer.status_code == 403 and answer.json()["error"]["code"] == "auth.scope"
    after = {reason: _failures(reason) for reason in before}
    assert after["missing"] - before["missing"] == 1
    assert after["malformed"] - before["malformed"] == 1
    assert after["unknown"] - before["unknown"] == 1
    assert after["scope"] - before["scope"] == 2  # the two scopes that are neither its own nor admin


def test_a_revoked_key_is_refused(client, served):
    key_id = served.keys["read"].split("_")[1]
    assert client.get("/v1/versions", headers=served.headers("read")).status_code == 200
    with served.ledger.session() as session:
        assert [row.id for row in access.revoke_key(session, key_id)] == [key_id]
    client.app.state.web.keys.forget(key_id)  # else refused within keys.CACHE_S
    assert client.get("/v1/versions", headers=served.headers("read")).status_code == 401


def test_submitting_is_idempotent_per_external_id_and_active_version(client, served):
    body = {"external_id": "upload-1", "image": {"b64": image_b64(1)}}
    first = client.post("/v1/checks", json=body, headers=served.headers("submit"))
    again = client.post("/v1/checks", json=body, headers=served.headers("submit"))
    assert (first.status_code, again.status_code) == (202, 200)
    assert first.json()["id"] == again.json()["id"] and first.json()["created"] and not again.json()["created"]
    assert first.json()["status"] == "queued"
    # when a worker runs it, the API reads the result the worker stored
    assert served.run_checks() == 1
    done = client.get(f"/v1/checks/{first.json()['id']}", headers=served.headers("read")).json()
    assert done["status"] == "done" and 0 <= done["p_fake"] <= 1 and done["object_count"] == len(done["objects"])


def test_a_rejected_check_is_replaced_by_a_corrected_resubmission(client, served):
    # given a check rejected at intake for its callback URL
    bad = {"external_id": "fixable", "image": {"b64": image_b64(3)}, "callback_url": "ftp://hooks.example/x"}
    rejected = client.post("/v1/checks", json=bad, headers=served.headers("submit"))
    assert rejected.status_code == 422 and rejected.json()["error"]["code"] == "callback.invalid"
    # when the platform sends it again, fixed, under the same external id
    fixed = {**bad, "callback_url": "https://hooks.example/x"}
    again = client.post("/v1/checks", json=fixed, headers=served.headers("submit"))
    # then that check is queued again from scratch, and scored like any other
    assert again.status_code == 202 and again.json()["created"] and again.json()["status"] == "queued"
    assert again.json()["id"] == rejected.json()["check"]["id"] and again.json()["error_code"] is None
    assert served.run_checks() == 1
    done = client.get(f"/v1/checks/{again.json()['id']}", headers=served.headers("read")).json()
    assert done["status"] == "done" and done["p_fake"] is not None


def test_another_image_under_a_live_or_answered_id_is_a_409_never_the_old_result(client, served):
    first = {"external_id": "taken", "image": {"b64": image_b64(4)}}
    queued = client.post("/v1/checks", json=first, headers=served.headers("submit")).json()
    other = {"external_id": "taken", "image": {"b64": image_b64(5)}}
    for _ in ("queued", "done"):
        answer = client.post("/v1/checks", json=other, headers=served.headers("submit"))
        assert answer.status_code == 409 and answer.json()["error"]["code"] == "check.conflict"
        assert queued["id"] in answer.json()["error"]["message"]
        served.run_checks()
    assert client.post("/v1/checks", json=first, headers=served.headers("submit")).status_code == 200  # the same
    invalid = {"external_id": "taken", "image": {"url": "ftp://nowhere/x"}}  # refused, and still not the old result
    assert client.post("/v1/checks", json=invalid, headers=served.headers("submit")).status_code in (409, 422)


@pytest.mark.parametrize("field", ["external_id", "callback_url", "url"])
def test_text_that_cannot_be_stored_is_refused_with_a_code(client, served, field):
    body = {"external_id": "ok", "image": {"url": "https://e.com/x"}, "callback_url": "https://h.example/y"}
    where = body["image"] if field == "url" else body
    where[field] += "\udcff"  # json.dumps writes it as the escape \udcff: valid JSON, invalid Unicode
    answer = client.post("/v1/checks", content=json.dumps(body), headers=served.headers("submit"))
    assert answer.status_code == 422 and answer.json()["error"]["code"] in (
        "message.no_external_id", "callback.invalid", "source.invalid", "message.invalid",
    )  # fmt: skip
    with served.ledger.session() as session:
        assert served.ledger.list_checks(session, limit=10) == []


def test_a_new_active_version_gets_its_own_check(client, served):
    body = {"external_id": "upload-2", "image": {"url": "https://example.com/2.png"}}
    first = client.post("/v1/checks", json=body, headers=served.headers("submit")).json()
    other = served.service.detector.pipeline_version.__class__(
        **{**vars(served.service.detector.pipeline_version), "head": "head:another"}
    )
    with served.ledger.session() as session:
        served.ledger.ensure_pipeline_version(session, other, "tiny", activate=True)
    second = client.post("/v1/checks", json=body, headers=served.headers("submit"))
    assert second.status_code == 202 and second.json()["id"] != first["id"]
    assert second.json()["pipeline_version_id"] == other.id != first["pipeline_version_id"]


def _error(response) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


@pytest.mark.parametrize(
    ("body", "code"),
    [
        ({"image": {"url": "https://example.com/a.png"}}, "message.no_external_id"),
        ({"external_id": "", "image": {"url": "https://example.com/a.png"}}, "message.no_external_id"),
        ({"external_id": "x" * 513, "image": {"url": "https://example.com/a.png"}}, "message.no_external_id"),
        ({"external_id": 7, "image": {"url": "https://example.com/a.png"}}, "message.no_external_id"),
        ({"external_id": "e1", "image": "https://example.com/a.png"}, "source.invalid"),
        ({"external_id": "e1", "image": {}}, "source.invalid"),
        ({"external_id": "e1", "image": {"url": "https://a.example/x", "b64": "AAAA"}}, "source.invalid"),
        ({"external_id": "e1", "image": {"path": "/etc/passwd"}}, "source.path_refused"),
        ({"external_id": "e1", "image": {"blob": "0" * 64}}, "source.invalid"),
        ({"external_id": "e1", "image": {"url": "https://a.example/x"}, "priority": 0}, "message.invalid"),
        ({"external_id": "e1", "image": {"url": "https://a.example/x"}, "callback_url": 5}, "callback.invalid"),
    ],
)
def test_malformed_bodies_get_422_with_the_stable_code_and_no_row(client, served, body, code):
    answer = client.post("/v1/checks", json=body, headers=served.headers("submit"))
    assert _error(answer) == (422, code)
    with served.ledger.session() as session:
        assert served.ledger.list_checks(session) == []


@pytest.mark.parametrize(
    ("image", "callback", "code"),
    [
        ({"b64": "not base64!"}, None, "source.bad_base64"),
        ({"b64": ""}, None, "image.empty"),  # filed, and rejected by the worker
        ({"url": "ftp://example.com/a.png"}, None, "url.refused"),  # filed, and refused by the worker
        ({"s3": "s3://Not_A_Bucket/key"}, None, "source.invalid"),
        ({"url": "https://example.com/a.png"}, "javascript:alert(1)", "callback.invalid"),
    ],
)
def test_what_the_intake_rejects_is_a_rejected_check_with_its_code(client, served, image, callback, code):
    body = {"external_id": "rejected-1", "image": image, "callback_url": callback}
    answer = client.post("/v1/checks", json=body, headers=served.headers("submit"))
    if answer.status_code == 202:  # what only reading the image can tell: the worker rejects it
        served.run_checks()
        check = client.get(f"/v1/checks/{answer.json()['id']}", headers=served.headers("read")).json()
        assert (check["status"], check["error_code"]) == ("rejected", code)
        return
    assert _error(answer) == (422, code)
    assert answer.json()["check"]["status"] == "rejected" and answer.json()["check"]["error_code"] == code
    # and the platform reads the same outcome later, as through any other intake
    again = client.get(f"/v1/checks/{answer.json()['check']['id']}", headers=served.headers("read")).json()
    assert again["error_code"] == code


def test_bodies_that_are_not_json_or_too_large(client, served):
    headers = {**served.headers("submit"), "Content-Type": "application/json"}
    assert _error(client.post("/v1/checks", content=b'{"external_id": ', headers=headers)) == (422, "message.not_json")
    huge = b'{"external_id": "big", "image": {"b64": "' + b"A" * body_limit(served.settings) + b'"}}'
    assert _error(client.post("/v1/checks", content=huge, headers=headers)) == (413, "request.too_large")

    def chunks():  # no Content-Length: the cap is counted as the body streams in
        yield b'{"external_id": "big", "image": {"b64": "'
        for _ in range(body_limit(served.settings) // 65536 + 2):
            yield b"A" * 65536

    assert _error(client.post("/v1/checks", content=chunks(), headers=headers)) == (413, "request.too_large")


def test_no_registered_version_is_503(client, served):
    with served.ledger.session() as session:
        for version in served.ledger.versions(session):
            version.activated_at = None
    answer = client.post("/v1/checks", json={"external_id": "e", "image": {"url": "https://a.example/x"}},
                         headers=served.headers("submit"))  # fmt: skip
    assert _error(answer) == (503, "version.none")


def test_unknown_check_is_404(client, served):
    assert _error(client.get("/v1/checks/nope", headers=served.headers("read"))) == (404, "check.not_found")
    assert client.get("/v1/checks/" + "x" * 400, headers=served.headers("read")).status_code == 404


def _file(client, served, n: int, prefix: str = "page") -> list[str]:
    ids = []
    for i in range(n):
        body = {"external_id": f"{prefix}-{i}", "image": {"url": f"https://example.com/{i}.png"}}
        ids.append(client.post("/v1/checks", json=body, headers=served.headers("submit")).json()["id"])
    return ids


def test_pages_cover_every_check_once_newest_first(client, served):
    filed = _file(client, served, 7)
    seen, cursor, pages = [], None, 0
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/checks", params=params, headers=served.headers("read")).json()
        seen += [item["id"] for item in page["items"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break
        _file(client, served, 1, prefix=f"late-{pages}")  # filed meanwhile: newer, so on no later page
    assert pages == 3 and seen == list(reversed(filed))


def test_filters_and_limits(client, served):
    ids = _file(client, served, 3)
    read = served.headers("read")
    by_id = client.get("/v1/checks", params={"external_id": "page-1"}, headers=read).json()["items"]
    assert [item["id"] for item in by_id] == [ids[1]]
    assert client.get("/v1/checks", params={"status": "done"}, headers=read).json()["items"] == []
    assert len(client.get("/v1/checks", params={"status": "queued"}, headers=read).json()["items"]) == 3
    later = (utcnow() + timedelta(minutes=1)).isoformat()
    assert client.get("/v1/checks", params={"since": later}, headers=read).json()["items"] == []
    assert len(client.get("/v1/checks", params={"until": later}, headers=read).json()["items"]) == 3
    assert _error(client.get("/v1/checks", params={"limit": 201}, headers=read)) == (422, "request.invalid")
    assert _error(client.get("/v1/checks", params={"status": "odd"}, headers=read)) == (422, "request.invalid")
    assert _error(client.get("/v1/checks", params={"cursor": "garbage!"}, headers=read)) == (422, "cursor.invalid")


def test_versions_and_health(client, served):
    versions = client.get("/v1/versions", headers=served.headers("read")).json()
    assert [(v["id"], v["active"]) for v in versions] == [(served.service.version_id, True)]
    assert client.get("/healthz").json() == {"ok": True}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["checks"]["migrations"]["ok"]


def test_callback_urls_are_shown_without_their_query(client, served):
    body = {"external_id": "cb", "image": {"url": "https://example.com/a.png"},
            "callback_url": "https://hooks.example.com/item?token=secret"}  # fmt: skip
    check = client.post("/v1/checks", json=body, headers=served.headers("submit")).json()
    assert "secret" not in check["callback_url"] and check["callback_url"].startswith("https://hooks.example.com")


def test_security_headers_on_every_answer(client, served):
    for answer in (client.get("/healthz"), client.get("/v1/versions")):
        assert "default-src 'none'" in answer.headers["content-security-policy"]
        assert answer.headers["x-content-type-options"] == "nosniff"


def test_concurrent_submissions_share_transactions_and_lose_nothing(client, served):
    from concurrent.futures import ThreadPoolExecutor

    # given 200 submissions at once, every fifth a repeat of an earlier one (the same id and image)
    names = [f"burst-{i - i % 5 if i % 5 == 4 else i}" for i in range(200)]
    bodies = [{"external_id": name, "image": {"url": f"https://e.com/{name}"}} for name in names]
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: client.post("/v1/checks", json=b, headers=served.headers("submit")), bodies))
    ids = {body["external_id"] for body in bodies}
    assert {answer.status_code for answer in answers} <= {200, 202}
    assert sum(answer.status_code == 202 for answer in answers) == len(ids)
    with served.ledger.session() as session:
        rows = served.ledger.list_checks(session, limit=1000)
    assert sorted(row.external_id for row in rows) == sorted(ids)
    by_external = {row.external_id: row.id for row in rows}
    assert all(
        answer.json()["id"] == by_external[body["external_id"]] for answer, body in zip(answers, bodies, strict=True)
    )


def test_an_unreachable_ledger_is_503_and_the_server_stays_up(served):
    from fastapi.testclient import TestClient

    from worker.web.app import create_app

    dead = served.settings.model_copy(update={"database_url": "postgresql+psycopg://postgres@127.0.0.1:1/none"})
    with TestClient(create_app(dead)) as down:
        body = {"external_id": "e", "image": {"url": "https://a.example/x"}}
        assert _error(down.post("/v1/checks", json=body, headers=served.headers("submit"))) == (
            503,
            "ledger.unavailable",
        )
        assert _error(down.get("/v1/versions", headers=served.headers("read"))) == (503, "ledger.unavailable")
        assert down.get("/healthz").status_code == 200 and down.get("/readyz").status_code == 503


def test_nul_characters_are_refused_with_a_code_not_a_database_error(client, served):
    headers = served.headers("submit") | served.headers("admin")
    nul_id = {"external_id": "a\x00b", "image": {"url": "https://a.example/x"}}
    assert _error(client.post("/v1/checks", json=nul_id, headers=headers)) == (422, "message.no_external_id")
    nul_url = {"external_id": "ok", "image": {"url": "https://a.example/\x00"}}
    assert _error(client.post("/v1/checks", json=nul_url, headers=headers)) == (422, "source.invalid")
    assert _error(client.get("/v1/checks", params={"verdict": "\x00"}, headers=headers)) == (422, "request.invalid")
    assert _error(client.get("/v1/checks/%00", headers=headers)) == (422, "request.invalid")


def test_a_head_with_an_uncertain_band_gives_three_verdicts_everywhere(client, served):
    from tests.conftest import random_head

    # given a head whose band covers every score below 0.999: every check is honestly unsure
    detector = served.service.detector
    detector.use_head(random_head(detector, threshold=0.999, threshold_low=0.0))
    served.service.register_version(activate=True)
    before = metrics.FLAGGED.labels(served.service.version_id, "uncertain")._value.get()
    body = {"external_id": "unsure-1", "image": {"b64": image_b64(3)}}
    filed = client.post("/v1/checks", json=body, headers=served.headers("submit")).json()
    served.run_checks()
    check = client.get(f"/v1/checks/{filed['id']}", headers=served.headers("read")).json()
    # then the result, the list filter, the metric and the console's queue all carry it
    assert (check["verdict"], check["threshold"], check["threshold_low"]) == ("uncertain", 0.999, 0.0)
    listed = client.get("/v1/checks", params={"verdict": "uncertain"}, headers=served.headers("read")).json()
    assert [item["id"] for item in listed["items"]] == [filed["id"]]
    assert metrics.FLAGGED.labels(served.service.version_id, "uncertain")._value.get() == before + 1
    form = client.get("/console/signin")
    csrf = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    client.post("/console/signin", data={"key": served.keys["read"], "csrf": csrf, "next": "/console"})
    queue = client.get("/console", params={"verdict": "uncertain"})
    assert queue.status_code == 200 and f"/console/checks/{filed['id']}" in queue.text
    assert "unsure-1" not in client.get("/console", params={"verdict": "fake"}).text


def test_a_result_carries_what_the_uploads_bytes_declare(client, served):
    import base64

    from tests import provenance_files as files

    # given an upload whose XMP packet declares AI generation, and one with a damaged C2PA manifest
    served.service.register_version(activate=True)
    declared = files.jpeg_with_xmp(files.xmp_packet())
    damaged = files.truncated_manifest(files.signed(files.jpeg(), files.credentials()))
    ids = {}
    for name, data in (("declared", declared), ("damaged", damaged)):
        body = {"external_id": f"provenance-{name}", "image": {"b64": base64.b64encode(data).decode()}}
        ids[name] = client.post("/v1/checks", json=body, headers=served.headers("submit")).json()["id"]
    served.run_checks()
    # then each result, as the API serves it, says so, and both were scored
    results = {name: client.get(f"/v1/checks/{i}", headers=served.headers("read")).json() for name, i in ids.items()}
    assert {result["status"] for result in results.values()} == {"done"}
    assert results["declared"]["provenance"]["declared_by"] == ["xmp"]
    assert results["declared"]["verdict_reason"] == "score"  # the default policy: provenance accompanies the score
    assert results["damaged"]["provenance"]["c2pa"]["validation_state"] == "invalid"
    assert [error["code"] for error in results["damaged"]["provenance"]["errors"]] == ["provenance.c2pa_invalid"]


def test_decisions_are_recorded_by_key_and_become_labels(client, served, tmp_path):
    from worker.labels import export_labels

    # given a finished check
    served.service.register_version(activate=True)
    body = {"external_id": "decided-1", "image": {"b64": image_b64(5)}}
    check_id = client.post("/v1/checks", json=body, headers=served.headers("submit")).json()["id"]
    served.run_checks()
    url = f"/v1/checks/{check_id}/decisions"
    # when a moderation tool records two decisions through the API, the later overriding the earlier
    first = client.post(url, json={"label": "unsure"}, headers=served.headers("review"))
    second = client.post(url, json={"label": "ai_generated", "note": " seen before "}, headers=served.headers("review"))
    assert first.status_code == second.status_code == 201
    # then both are listed newest first, with the key that made them, and the export labels the check fake
    listed = client.get(url, headers=served.headers("read")).json()
    assert [(d["label"], d["reviewer"], d["note"]) for d in listed] == [
        ("ai_generated", "test-review", "seen before"),
        ("unsure", "test-review", None),
    ]
    exported = export_labels(served.settings, served.ledger, tmp_path)
    assert exported.exported == 1
    # and a label the console does not give, an unknown field or an unknown check is refused with a code
    for wrong in ({"label": "maybe"}, {"label": "unsure", "why": "x"}):
        refused = client.post(url, json=wrong, headers=served.headers("review"))
        assert refused.status_code == 422 and refused.json()["error"]["code"] == "message.invalid"
    missing = client.post("/v1/checks/nope/decisions", json={"label": "unsure"}, headers=served.headers("review"))
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "check.not_found"
