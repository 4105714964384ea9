"""Bad settings are input too: a list written as an operator writes it (comma-separated) is read, a JSON one still
is, and every value that cannot be read ends a command with one `settings.invalid` line naming its variable, never
a traceback."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path
from typing import get_origin

import pytest
from pydantic_settings import BaseSettings
from pydantic_settings import SettingsError as LibrarySettingsError

from worker.settings import Settings, SettingsError, _undecodable, load_settings

ITEM = Path(sys.executable).parent / "item"


@pytest.mark.parametrize(
    ("name", "written", "read"),
    [
        ("FETCH_ALLOWED_NETWORKS", "10.1.0.0/16", ["10.1.0.0/16"]),
        ("FETCH_ALLOWED_NETWORKS", " 10.1.0.0/16 ,, fd00::/8 ,", ["10.1.0.0/16", "fd00::/8"]),
        ("FETCH_ALLOWED_NETWORKS", '["10.1.0.0/16", "10.2.0.0/16"]', ["10.1.0.0/16", "10.2.0.0/16"]),
        ("CALLBACK_ALLOWED_NETWORKS", "192.168.4.0/24,10.9.9.9", ["192.168.4.0/24", "10.9.9.9/32"]),
        ("S3_ALLOWED_BUCKETS", "images, uploads", ["images", "uploads"]),
        ("S3_ALLOWED_BUCKETS", '["images"]', ["images"]),
        ("S3_ALLOWED_BUCKETS", "", []),
        ("STORE_ARTIFACTS", "caption,embed", ["caption", "embed"]),
        ("FETCH_ALLOWED_HOSTS", "cdn.example.com, *.IMG.example.com.", ["cdn.example.com", "*.img.example.com"]),
    ],
)
def test_a_list_is_read_comma_separated_or_as_json(monkeypatch, name, written, read):
    monkeypatch.setenv(f"ITEM_{name}", written)
    assert getattr(load_settings(), name.lower()) == read


def test_every_list_setting_reads_plain_text(monkeypatch):
    # A list field declared without NoDecode would be json.loads-ed by pydantic-settings: a traceback again.
    lists = [name for name, field in Settings.model_fields.items() if get_origin(field.annotation) is list]
    assert {"fetch_allowed_networks", "fetch_allowed_hosts", "s3_allowed_buckets"} <= set(lists)
    for name in lists:
        monkeypatch.setenv(f"ITEM_{name.upper()}", "caption, features")  # a plain list, valid for some of them
        try:
            assert load_settings().model_dump(mode="json")[name] == ["caption", "features"]
        except SettingsError as refused:  # not a network, or not a path anyone may read: said, naming it
            assert f"ITEM_{name.upper()}=caption, features: " in refused.message, name
            assert "valid list" not in refused.message, name
        monkeypatch.delenv(f"ITEM_{name.upper()}")


def test_path_roots_are_read_comma_separated(monkeypatch, tmp_path):
    monkeypatch.setenv("ITEM_ALLOWED_PATH_ROOTS", f"{tmp_path / 'a'}, {tmp_path / 'b'}")
    assert load_settings().allowed_path_roots == [tmp_path / "a", tmp_path / "b"]


def test_a_network_is_kept_as_its_users_parse_it_again(monkeypatch):
    # Host bits set: read as its network, so the strict `ip_network` of the fetch and the callbacks takes it too.
    monkeypatch.setenv("ITEM_FETCH_ALLOWED_NETWORKS", "10.1.2.3/16")
    [network] = load_settings().fetch_allowed_networks
    assert network == "10.1.0.0/16" and ipaddress.ip_network(network) == ipaddress.ip_network("10.1.0.0/16")


@pytest.mark.parametrize(
    ("name", "written", "said"),
    [
        ("FETCH_ALLOWED_NETWORKS", "10.1.0.0/33", "is not a network"),
        ("CALLBACK_ALLOWED_NETWORKS", "10.1.0.0/16,intranet", "'intranet' is not a network"),
        ("FETCH_ALLOWED_NETWORKS", '["10.1.0.0/16"', "not a JSON list"),
        ("FETCH_ALLOWED_HOSTS", "https://cdn.example.com", "is not a host name"),
        ("FETCH_ALLOWED_HOSTS", "cdn.example.com:8443", "is not a host name"),
        ("FETCH_ALLOWED_HOSTS", "cdn.example.com/images", "is not a host name"),
        ("FETCH_ALLOWED_HOSTS", "*", "is not a host name"),
        ("FETCH_ALLOWED_HOSTS", "cdn.*.example.com", "is not a host name"),
        ("FETCH_ALLOWED_HOSTS", "-cdn.example.com", "is not a host name"),
        ("STAGE_PRECISION", "{ground: bf16}", "not valid JSON"),
    ],
)
def test_an_unreadable_value_is_one_error_naming_its_variable(monkeypatch, name, written, said):
    monkeypatch.setenv(f"ITEM_{name}", written)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert refused.value.code == "settings.invalid"
    assert f"ITEM_{name}" in refused.value.message and said in refused.value.message
    assert "\n" not in refused.value.message


def test_a_library_error_with_no_field_named_is_still_ours():
    class Strict(BaseSettings):
        model_config = {"env_prefix": "ITEM_TEST_"}
        table: dict[str, str] = {}

    os.environ["ITEM_TEST_TABLE"] = "{"
    try:
        with pytest.raises(LibrarySettingsError) as raised:
            Strict()
    finally:
        del os.environ["ITEM_TEST_TABLE"]
    assert _undecodable(raised.value).startswith("Invalid settings: ITEM_TABLE: not valid JSON (")
    assert _undecodable(LibrarySettingsError("something else")) == "Invalid settings: something else"


def test_the_metrics_endpoint_listens_on_loopback_unless_told():
    import yaml

    assert Settings.model_fields["metrics_addr"].default == "127.0.0.1"
    # In compose, Prometheus scrapes the workers over the compose network: they must say so.
    compose = yaml.safe_load((Path(__file__).parents[3] / "ops" / "compose.yaml").read_text())
    for name in ("worker-gpu", "worker-cpu"):
        assert compose["services"][name]["environment"]["ITEM_METRICS_ADDR"] == "0.0.0.0", name


def _item(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """A cheap `item` command (it reads the settings, lists files, opens no ledger) in a folder with no `.env`."""
    names = {key: value for key, value in os.environ.items() if not key.startswith("ITEM_")}
    command = [str(ITEM), "models", "list", "--profile", "tiny", "--json"]
    return subprocess.run(
        command, env={**names, "ITEM_MODEL_DIR": str(tmp_path), **env}, cwd=tmp_path, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip


def test_a_command_reads_a_plain_cidr(tmp_path):
    result = _item(tmp_path, ITEM_FETCH_ALLOWED_NETWORKS="10.1.0.0/16", ITEM_S3_ALLOWED_BUCKETS="images,uploads")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("tiny") >= 3 and result.stderr == ""


@pytest.mark.parametrize(
    ("name", "written"),
    [
        ("FETCH_ALLOWED_NETWORKS", "10.1.0.0/16,not-a-network"),
        ("CALLBACK_ALLOWED_NETWORKS", "[10.1.0.0/16]"),  # JSON without the quotes
        ("FETCH_ALLOWED_HOSTS", "http://cdn.example.com/"),
        ("S3_ALLOWED_BUCKETS", '["images",'),
        ("STAGE_PRECISION", "ground=bf16"),
        ("STORE_ARTIFACTS", "caption,pixels"),
    ],
)
def test_a_command_with_an_unreadable_value_says_so_in_one_line_and_exits_2(tmp_path, name, written):
    result = _item(tmp_path, **{f"ITEM_{name}": written})
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()  # a traceback would be dozens
    assert line.startswith("error [settings.invalid] Invalid settings: ") and f"ITEM_{name}" in line
