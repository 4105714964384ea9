"""The `item` command as a user runs it: a real process, the installed entry point, files on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.core.profiles import get_profile
from tests.conftest import encode, noise_image

ITEM = Path(sys.executable).parent / "item"
REQUIRED_KEYS = {"path", "sha256", "p_fake", "verdict", "caption", "objects", "pipeline_version", "error"}


@pytest.fixture(scope="module")
def env(tiny_store):
    for spec in get_profile("tiny").specs.values():
        tiny_store.locate(spec)  # generated once per session, shared with the unit tests
    return {**os.environ, "ITEM_MODEL_DIR": str(tiny_store.model_dir), "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}


@pytest.fixture(scope="module")
def demo(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    result = run(env, "demo", "--out", str(out), "--per-family", "8")
    return out, result


def run(env, *args: str, check_exit: int | None = 0) -> subprocess.CompletedProcess:
    result = subprocess.run([str(ITEM), *args], env=env, capture_output=True, text=True, timeout=300)
    if check_exit is not None:
        assert result.returncode == check_exit, result.stdout + result.stderr
    return result


def test_demo_trains_a_head_and_reports_accuracy(demo):
    out, result = demo
    assert (out / "head.safetensors").is_file() and (out / "head.json").is_file()
    assert "accuracy on 8 held-out images" in result.stdout
    assert "not detection quality" in result.stderr  # says plainly what the tiny profile shows
    accuracy = float(result.stdout.split("held-out images: ")[1].split("%")[0])
    assert accuracy >= 75.0  # two visibly different families: the signal survives the whole pipeline
    head_meta = json.loads((out / "head.json").read_text())
    assert head_meta["profile"] == "tiny" and head_meta["training"]["epochs"] == 50


def test_scan_json_on_a_folder_with_broken_files(env, demo, tmp_path):
    out, _ = demo
    folder = tmp_path / "uploads"
    (folder / "nested").mkdir(parents=True)
    (folder / "good.png").write_bytes(encode(noise_image(1)))
    (folder / "nested" / "good.jpg").write_bytes(encode(noise_image(2), "JPEG"))
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "page.png").write_text("<!doctype html><html></html>")
    (folder / "cut.png").write_bytes(encode(noise_image(3))[:400])
    (folder / ".hidden.png").write_bytes(b"skipped")

    result = run(
        env, "scan", "--profile", "tiny", "--head", str(out / "head.safetensors"), "--json", str(folder), check_exit=1
    )

    rows = {Path(row["path"]).name: row for row in map(json.loads, result.stdout.splitlines())}
    assert set(rows) == {"good.png", "good.jpg", "empty.jpg", "page.png", "cut.png"}
    assert all(set(row) >= REQUIRED_KEYS for row in rows.values())
    assert rows["empty.jpg"]["error"]["code"] == "image.empty"
    assert rows["page.png"]["error"]["code"] == "image.unsupported_format"
    assert rows["cut.png"]["error"]["code"] == "image.truncated"
    for name in ("good.png", "good.jpg"):
        assert rows[name]["error"] is None
        assert 0.0 <= rows[name]["p_fake"] <= 1.0 and rows[name]["verdict"] in ("real", "fake")
        assert rows[name]["pipeline_version"]["head"].startswith("head:")
    assert "3 of 5 files could not be checked" in result.stderr


def test_scan_table_of_good_files_exits_zero(env, demo):
    out, _ = demo
    result = run(env, "scan", "-p", "tiny", "--head", str(out / "head.safetensors"), str(out / "images" / "smooth"))
    assert "smooth-007.png" in result.stdout and "ITEM scan" in result.stdout
    assert "plumbing only" in result.stderr


def test_scan_scores_the_same_as_the_demo(env, demo):
    out, result = demo
    demo_rows = json.loads(run(env, "demo", "--out", str(out), "--per-family", "8", "--json").stdout.splitlines()[0])
    scanned = run(env, "scan", "-p", "tiny", "--head", str(out / "head.safetensors"), "--json", demo_rows["path"])
    row = json.loads(scanned.stdout)
    assert row["sha256"] == demo_rows["sha256"]
    assert row["p_fake"] == pytest.approx(demo_rows["p_fake"], abs=1e-4)


def test_a_random_profile_scans_with_an_untrained_head(env, tmp_path):
    image = tmp_path / "one.png"
    image.write_bytes(encode(noise_image(3)))
    result = run(env, "scan", "-p", "tiny", "--head", "untrained", "--json", str(image))
    row = json.loads(result.stdout)
    assert row["error"] is None and 0 <= row["p_fake"] <= 1 and row["verdict"] in ("real", "fake")
    assert "plumbing only" in run(env, "scan", "-p", "tiny", "--head", "untrained", str(image)).stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["scan", "-p", "tiny", "x.png"], "No head given"),
        (["scan", "-p", "nope", "--head", "h.safetensors", "x.png"], "profile.unknown"),
        (["scan", "-p", "paper", "--offline", "--head", "{head}", "x.png"], "model.missing"),
        (["scan", "-p", "tiny", "--head", "/does/not/exist.safetensors", "x.png"], "head.missing"),
        (["scan", "-p", "paper", "--offline", "--head", "untrained", "x.png"], "head.untrained_refused"),
    ],
)
def test_setup_errors_exit_2_with_a_clear_message(env, demo, args, message):
    head = str(demo[0] / "head.safetensors")
    result = run(env, *[a.replace("{head}", head) for a in args], check_exit=2)
    assert message in result.stderr


def test_a_model_that_does_not_load_is_a_setup_error(env, demo, tmp_path):
    import shutil

    models = tmp_path / "models"
    shutil.copytree(env["ITEM_MODEL_DIR"], models)
    (models / "tiny-blip2" / "model.safetensors").write_bytes(b"not a safetensors file")
    broken = {**env, "ITEM_MODEL_DIR": str(models)}
    result = run(broken, "scan", "-p", "tiny", "--head", str(demo[0] / "head.safetensors"), "x.png", check_exit=2)
    assert "model.load_failed" in result.stderr and "caption" in result.stderr


def test_models_list_json(env):
    rows = [json.loads(line) for line in run(env, "models", "list", "--json").stdout.splitlines()]
    tiny = [row for row in rows if row["profile"] == "tiny"]
    assert {row["stage"] for row in tiny} == {"caption", "ground", "embed"}
    assert all(row["present"] for row in tiny)
    assert not any(row["present"] for row in rows if row["profile"] == "paper")


@pytest.mark.parametrize("command", [[], ["scan"], ["demo"], ["models", "pull"]])
def test_help_everywhere(env, command):
    assert "Usage" in run(env, *command, "--help").stdout


def test_embedded_mode_without_a_broker(env, demo, tmp_path):
    """No services: `item submit` runs the check in-process into a SQLite ledger file."""
    ledger = tmp_path / "ledger.sqlite3"
    local = {
        **env,
        "ITEM_DATABASE_URL": f"sqlite:///{ledger}",
        "ITEM_PROFILE": "tiny",
        "ITEM_HEAD": str(demo[0] / "head.safetensors"),
    }
    local.pop("ITEM_BROKER_URL", None)
    run(local, "db", "upgrade")
    image = tmp_path / "upload.png"
    image.write_bytes(encode(noise_image(5)))
    submitted = json.loads(run(local, "submit", "--json", "-e", "upload-5", str(image)).stdout)
    assert submitted["status"] == "done"  # run before the command returned
    status = json.loads(run(local, "status", "--json", submitted["check_id"]).stdout)
    assert status["status"] == "done" and status["external_id"] == "upload-5" and status["verdict"] in ("real", "fake")

    # A check that cannot succeed: exit 1, and the line says which code ended it.
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"<!doctype html><html></html>")
    result = run(local, "submit", "-e", "broken-1", "-e", "upload-5b", str(broken), str(image), check_exit=1)
    assert "rejected" in result.stdout and "image.unsupported_format" in result.stdout
    assert "1 of 2 checks were rejected" in result.stderr

    # A listing cut by its limit says so (on stderr: stdout stays one check per line).
    listed = run(local, "results", "--json", "--limit", "1")
    assert len(listed.stdout.splitlines()) == 1 and "more match" in listed.stderr
    assert "more match" not in run(local, "results", "--json", "--limit", "10").stderr


def test_db_commands_upgrade_and_downgrade_a_sqlite_ledger(env, tmp_path):
    local = {**env, "ITEM_DATABASE_URL": f"sqlite:///{tmp_path / 'l.sqlite3'}"}
    assert run(local, "db", "current").stdout.strip() == "None"
    head = run(local, "db", "upgrade").stdout.split()[-1]
    assert head != "None" and run(local, "db", "current").stdout.strip() == head
    assert run(local, "db", "downgrade", "base").stdout.strip().endswith("None")


def test_db_maintain_drops_expired_days_and_says_so_in_json(env, tmp_path):
    import sqlite3

    ledger = tmp_path / "l.sqlite3"
    local = {**env, "ITEM_DATABASE_URL": f"sqlite:///{ledger}", "ITEM_RETAIN_DEAD_LETTERS_DAYS": "2"}
    run(local, "db", "upgrade")
    with sqlite3.connect(ledger) as connection:
        for n, received in enumerate(("2026-01-02 03:04:05.000000", "2999-01-01 00:00:00.000000")):
            connection.execute(
                "INSERT INTO dead_letters (id, received_at, code, reason) VALUES (?, ?, 'message.invalid', 'x')",
                (f"dl-{n}", received),
            )
    dry = json.loads(run(local, "db", "maintain", "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["dropped"] == ["dead_letters 2026-01-02"] and dry["rows_deleted"] == 0
    done = json.loads(run(local, "db", "maintain", "--json").stdout)
    assert done["dropped"] == ["dead_letters 2026-01-02"] and done["rows_deleted"] == 1
    with sqlite3.connect(ledger) as connection:
        assert connection.execute("SELECT id FROM dead_letters").fetchall() == [("dl-1",)]
    refused = run({**local, "ITEM_RETAIN_KEYS_DAYS": "30", "ITEM_RETAIN_CHECKS_DAYS": "7"}, "db", "maintain",
                  check_exit=2)  # fmt: skip
    assert "settings.invalid" in refused.stderr and "retain_keys_days" in refused.stderr


def test_versions_and_rescore_in_embedded_mode(env, demo, tmp_path):
    """A new head, registered then activated, re-scores what the old one checked; both results stay readable."""
    from dataclasses import replace

    from pipeline.core.head import Head

    old_head = Head.load(demo[0] / "head.safetensors")
    new_head = Head(old_head.module, replace(old_head.metadata, threshold=0.01)).save(tmp_path / "new.safetensors")
    local = {**env, "ITEM_DATABASE_URL": f"sqlite:///{tmp_path / 'l.sqlite3'}", "ITEM_PROFILE": "tiny"}
    local.pop("ITEM_BROKER_URL", None)
    old = {**local, "ITEM_HEAD": str(demo[0] / "head.safetensors")}
    new = {**local, "ITEM_HEAD": str(new_head)}
    run(local, "db", "upgrade")
    images = [tmp_path / f"{seed}.png" for seed in range(3)]
    for seed, image in enumerate(images):
        image.write_bytes(encode(noise_image(seed)))
    run(old, "submit", *map(str, images))

    registered = json.loads(run(new, "versions", "register", "--no-activate", "--json").stdout)
    refused = run(new, "rescore", check_exit=2)
    assert "version.not_active" in refused.stderr and registered["id"] in refused.stderr
    run(local, "versions", "activate", registered["id"])

    summary = json.loads(run(new, "rescore", "--json").stdout)
    assert (summary["selected"], summary["created"], summary["statuses"]["done"]) == (3, 3, 3)
    assert summary["flipped_to_real"] == 0  # a threshold of 0.01 can only turn verdicts to fake
    versions = [json.loads(line) for line in run(local, "versions", "--json").stdout.splitlines()]
    assert [(v["active"], v["checks"].get("done")) for v in versions] == [(False, 3), (True, 3)]
    assert versions[0]["changed"] is None and list(versions[1]["changed"]) == ["head"]
    per_version = [
        json.loads(line) for line in run(local, "results", "--json", "-e", str(images[0])).stdout.splitlines()
    ]
    assert {row["pipeline_version_id"] for row in per_version} == {versions[0]["id"], versions[1]["id"]}
    assert json.loads(run(new, "rescore", "--json").stdout)["created"] == 0
