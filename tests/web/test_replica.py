"""Reads that may be stale go to the read replica (ITEM_DATABASE_REPLICA_URL); a visitor's reads right after their
own write, keys and sessions go to the primary; a replica that is down costs nothing but a fallback.

The "replica" is a second PostgreSQL database with the same migrations, filled by copying the primary's rows and
then made to differ, so every answer says which database it came from: streaming replication itself would need the
server reconfigured. Keys and console sessions exist on the primary only, so every request that gets in proves
they were read there.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from tests.integration.conftest import temporary_postgres_database
from tests.web.conftest import image_b64
from worker.ledger import migrate
from worker.ledger.models import Base, CheckRow, PipelineVersionRow
from worker.ledger.store import Ledger
from worker.ops import metrics
from worker.web.app import create_app
from worker.web.replica import WROTE_COOKIE

REPLICATED = (PipelineVersionRow, CheckRow)  # what the pages below read
AS_THE_REPLICA_HAS_IT = "as-the-replica-has-it"


@pytest.fixture(scope="module")
def replica_database() -> Iterator[str]:
    with temporary_postgres_database() as url:
        migrate.upgrade(url)
        yield url


@pytest.fixture
def replica(replica_database) -> Iterator[Ledger]:
    """The replica, emptied; the test's own writable connection to it (the app's is read-only)."""
    ledger = Ledger(replica_database)
    with ledger.session() as session:
        for table in reversed(Base.metadata.sorted_tables):
            session.execute(sa.delete(table))
    yield ledger
    ledger.dispose()


def _client(served, replica_url: str) -> TestClient:
    settings = served.settings.model_copy(update={"database_replica_url": replica_url})
    return TestClient(create_app(settings), follow_redirects=False)


def _filed_and_done(served, client, external_id: str) -> str:
    body = {"external_id": external_id, "image": {"b64": image_b64(7)}}
    answer = client.post("/v1/checks", json=body, headers=served.headers("submit"))
    assert answer.status_code == 202
    served.run_checks()
    return answer.json()["id"]


def _replicate(primary: Ledger, replica: Ledger) -> None:
    """What streaming replication would have done by now: the replica holds the primary's rows."""
    for model in REPLICATED:
        with primary.session() as source:
            rows = [dict(row) for row in source.execute(sa.select(model.__table__)).mappings()]
        with replica.session() as target:
            if rows:  # an empty list would insert one row of defaults
                target.execute(sa.insert(model.__table__), rows)


def _sign_in(client: TestClient, key: str) -> None:
    form = client.get("/console/signin")
    csrf = form.text.split('name="csrf" value="', 1)[1].split('"', 1)[0]
    assert client.post("/console/signin", data={"key": key, "csrf": csrf, "next": "/console"}).status_code == 303


def _csrf(page_text: str) -> str:
    return page_text.split('name="csrf" value="', 1)[1].split('"', 1)[0]


def _fallbacks(reason: str) -> float:
    return metrics.REPLICA_FALLBACKS.labels(reason)._value.get()


def test_stale_reads_go_to_the_replica_and_a_visitors_reads_after_their_write_to_the_primary(served, replica):
    # given a finished check on the primary, replicated, and then told apart: the replica's copy is renamed
    with _client(served, replica.engine.url.render_as_string(hide_password=False)) as client:
        check_id = _filed_and_done(served, client, "upload-1")
        _replicate(served.ledger, replica)
        with replica.session() as session:
            session.execute(sa.update(CheckRow).values(external_id=AS_THE_REPLICA_HAS_IT))
        client.cookies.delete(WROTE_COOKIE)  # filing was a write: its reads would be the primary's for a while
        # then the API's lists and pages read the replica; the key that let them in is on the primary only
        listed = client.get("/v1/checks", headers=served.headers("read")).json()["items"]
        assert [item["external_id"] for item in listed] == [AS_THE_REPLICA_HAS_IT]
        one = client.get(f"/v1/checks/{check_id}", headers=served.headers("read")).json()
        assert one["external_id"] == AS_THE_REPLICA_HAS_IT
        assert client.get("/v1/versions", headers=served.headers("read")).status_code == 200
        # when a moderator signs in (a session on the primary), the page the sign-in redirects to reads the primary
        _sign_in(client, served.keys["review"])
        assert "upload-1" in client.get("/console", params={"verdict": "any"}).text
        client.cookies.delete(WROTE_COOKIE)  # READ_OWN_WRITES_S later
        assert AS_THE_REPLICA_HAS_IT in client.get("/console", params={"verdict": "any"}).text
        # and a decision's redirect shows the decision, read from the primary, which the replica does not have yet
        page = client.get(f"/console/checks/{check_id}")
        form = {"label": "authentic", "csrf": _csrf(page.text)}
        decided = client.post(f"/console/checks/{check_id}/decision", data=form)
        assert decided.status_code == 303 and WROTE_COOKIE in decided.cookies
        after = client.get(decided.headers["location"]).text
        assert "upload-1" in after and "decision-entry" in after
        client.cookies.delete(WROTE_COOKIE)
        later = client.get(f"/console/checks/{check_id}").text
        assert AS_THE_REPLICA_HAS_IT in later and "decision-entry" not in later
        assert client.get("/console/operations").status_code == 200


def test_a_check_the_replica_has_not_received_yet_is_read_from_the_primary(served, replica):
    with _client(served, replica.engine.url.render_as_string(hide_password=False)) as client:
        _replicate(served.ledger, replica)  # the version; the check below is filed after this
        check_id = _filed_and_done(served, client, "just-filed")
        client.cookies.delete(WROTE_COOKIE)  # a platform's client keeps no cookies
        before = _fallbacks("not_found")
        # the list is the replica's, a little behind; a 404 is never the replica's word
        assert client.get("/v1/checks", headers=served.headers("read")).json()["items"] == []
        one = client.get(f"/v1/checks/{check_id}", headers=served.headers("read"))
        assert one.status_code == 200 and one.json()["external_id"] == "just-filed"
        _sign_in(client, served.keys["read"])
        client.cookies.delete(WROTE_COOKIE)
        assert "just-filed" in client.get(f"/console/checks/{check_id}").text
        assert _fallbacks("not_found") == before + 2


def test_the_replica_refuses_writes_as_a_hot_standby_would(served, replica):
    with _client(served, replica.engine.url.render_as_string(hide_password=False)) as client:
        follower = client.app.state.web.reads.replica
        with pytest.raises(sa.exc.InternalError, match="read-only transaction"), follower.session() as session:
            session.execute(sa.delete(CheckRow))


def test_a_replica_that_is_down_falls_back_to_the_primary(served, caplog):
    with _client(served, "postgresql+psycopg://postgres@127.0.0.1:1/none") as client:
        _filed_and_done(served, client, "on-the-primary")
        client.cookies.delete(WROTE_COOKIE)
        before = _fallbacks("unreachable")
        with caplog.at_level(logging.WARNING, logger="item.web"):
            for _ in range(2):
                listed = client.get("/v1/checks", headers=served.headers("read"))
                assert listed.status_code == 200
                assert [item["external_id"] for item in listed.json()["items"]] == ["on-the-primary"]
            _sign_in(client, served.keys["read"])
            client.cookies.delete(WROTE_COOKIE)
            assert client.get("/console/operations").status_code == 200
        # every read was counted; the warning came once: the replica is left alone for a while after a failure
        assert _fallbacks("unreachable") == before + 3
        warnings = [record for record in caplog.records if "read replica is unreachable" in record.getMessage()]
        assert len(warnings) == 1
