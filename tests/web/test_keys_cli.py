"""`item keys create | list | revoke` as a person runs them, against the API the keys open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ITEM = Path(sys.executable).parent / "item"


def _item(served, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ITEM_DATABASE_URL": served.settings.database_url}
    return subprocess.run([ITEM, *args], env=env, capture_output=True, text=True, timeout=60)


def test_a_key_is_shown_once_works_for_its_scopes_and_stops_when_revoked(served, client):
    made = _item(served, "keys", "create", "--scope", "submit,read", "--name", "uploader", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert key["scopes"] == ["submit", "read"] and key["key"].startswith(f"item_{key['id']}_")
    headers = {"Authorization": f"Bearer {key['key']}"}
    assert client.get("/v1/versions", headers=headers).status_code == 200
    # listed by id, name and scopes, never with its secret
    listed = _item(served, "keys", "list", "--json")
    rows = [json.loads(line) for line in listed.stdout.splitlines()]
    assert any(row["id"] == key["id"] and row["name"] == "uploader" for row in rows)
    assert key["key"] not in listed.stdout and key["key"].split("_")[2] not in _item(served, "keys", "list").stdout
    # revoked by name: refused from then on (this process trusts what it checked for keys.CACHE_S)
    assert _item(served, "keys", "revoke", "uploader").returncode == 0
    client.app.state.web.keys.forget(key["id"])
    assert client.get("/v1/versions", headers=headers).status_code == 401
    everything = [json.loads(line) for line in _item(served, "keys", "list", "--all", "--json").stdout.splitlines()]
    assert [row["revoked_at"] is not None for row in everything if row["id"] == key["id"]] == [True]


def test_bad_scopes_and_unknown_keys_say_so(served):
    bad = _item(served, "keys", "create", "--scope", "root", "--name", "x")
    assert bad.returncode == 2 and "key.invalid" in bad.stderr and "root" in bad.stderr
    assert _item(served, "keys", "revoke", "nobody").returncode == 1


def test_an_unmigrated_ledger_says_what_to_run(tmp_path):
    env = {**os.environ, "ITEM_DATABASE_URL": f"sqlite:///{tmp_path / 'fresh.sqlite3'}", "COLUMNS": "200"}
    for args in (("keys", "create", "--scope", "read", "--name", "x"), ("keys", "list"), ("serve",)):
        result = subprocess.run([ITEM, *args], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and "item db upgrade" in result.stderr, args
