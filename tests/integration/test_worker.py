"""The whole service for real: the `item` client, Redis, `item worker` processes, Postgres.

Each module run gets its own Postgres database and Redis key prefix, so runs never collide. Workers run
the tiny profile on the CPU with short time budgets, so failure paths resolve in seconds.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time

import pytest
import sqlalchemy as sa

from tests.conftest import encode, noise_image
from tests.integration.stack import ITEM, TERMINAL, Worker, make_stack, run_item
from worker.ledger.models import CheckRow


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    yield from make_stack(postgres_url, tiny_store, tmp_path_factory.mktemp("stack"))


@pytest.fixture(scope="module")
def worker(stack):
    process = Worker(stack, "worker")
    yield process
    process.stop()


def test_happy_path_through_a_real_worker(stack, worker):
    paths = [stack.image(seed) for seed in range(3)]
    submitted = stack.submit(*map(str, paths))
    rows = stack.wait_terminal([s["check_id"] for s in submitted])
    for row in rows.values():
        assert row.status == "done", (row.error_code, row.error_message)
        assert 0.0 <= row.p_fake <= 1.0 and row.verdict in ("real", "fake")
        assert row.image_sha256 and row.caption is not None and row.object_count == len(row.objects)
        assert row.pipeline_version_id.startswith("pv-")
    status = json.loads(run_item(stack.env, "status", "--json", submitted[0]["check_id"]).stdout)
    assert status["status"] == "done" and status["external_id"] == str(paths[0])


def test_same_external_id_twice_is_one_check(stack, worker):
    path = str(stack.image(10))
    first = stack.submit(path, "-e", "upload-10")[0]
    second = stack.submit(path, "-e", "upload-10")[0]
    assert first["check_id"] == second["check_id"] and first["created"] and not second["created"]
    stack.wait_terminal([first["check_id"]])
    with stack.ledger.session() as session:
        count = session.scalar(sa.select(sa.func.count()).where(CheckRow.external_id == "upload-10"))
    assert count == 1


def test_same_bytes_under_two_ids_run_the_models_once(stack, worker):
    path = str(stack.image(20))
    before = worker.model_images()
    first = stack.submit(path, "-e", "dup-a")[0]
    stack.wait_terminal([first["check_id"]])
    second = stack.submit(path, "-e", "dup-b")[0]
    rows = stack.wait_terminal([second["check_id"]])
    assert worker.model_images() - before == 1
    with stack.ledger.session() as session:
        one = stack.ledger.get_check(session, first["check_id"])
    assert rows[second["check_id"]].p_fake == one.p_fake and rows[second["check_id"]].status == "done"


def test_foreign_client_raw_message(stack, worker):
    """What a platform in another language does: LPUSH a Celery protocol-2 JSON message, no ledger row."""
    data = base64.b64encode(encode(noise_image(30))).decode()
    stack.push_raw({"external_id": "foreign-30", "image": {"b64": data}})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with stack.ledger.session() as session:
            row = session.scalar(sa.select(CheckRow).where(CheckRow.external_id == "foreign-30"))
        if row is not None and row.status in TERMINAL:
            break
        time.sleep(0.3)
    assert row is not None and row.status == "done", row and (row.status, row.error_code)


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (b"", "image.empty"),
        (b"<!doctype html><html><body>not an image</body></html>", "image.unsupported_format"),
        (b"%PDF-1.7\n1 0 obj", "image.unsupported_format"),
    ],
)
def test_bad_images_are_rejected_with_their_code(stack, worker, content, code):
    bad = stack.folder / f"bad-{code}-{len(content)}.bin"
    bad.write_bytes(content)
    submitted = stack.submit(str(bad), str(stack.image(40 + len(content) % 7)))
    rows = stack.wait_terminal([s["check_id"] for s in submitted])
    bad_row, good_row = rows[submitted[0]["check_id"]], rows[submitted[1]["check_id"]]
    assert bad_row.status == "rejected" and bad_row.error_code == code and bad_row.attempts == 1
    assert good_row.status == "done"  # the worker keeps serving


def test_truncated_image_is_rejected(stack, worker):
    cut = stack.folder / "cut.png"
    cut.write_bytes(encode(noise_image(50))[:300])
    row = stack.wait_terminal([stack.submit(str(cut))[0]["check_id"]])
    assert next(iter(row.values())).error_code == "image.truncated"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/x.png",
        "http://10.1.2.3/x.png",
        "http://169.254.169.254/latest/meta-data",
        "file:///etc/passwd",
    ],
)
def test_private_urls_are_refused(stack, worker, url):
    row = next(iter(stack.wait_terminal([stack.submit(url, "-e", f"ssrf-{url}")[0]["check_id"]]).values()))
    assert row.status == "rejected" and row.error_code.startswith(("url.", "source.")), row.error_code


def test_path_outside_the_allowed_roots_is_refused(stack, worker):
    row = next(iter(stack.wait_terminal([stack.submit("/etc/hostname", "--by-path")[0]["check_id"]]).values()))
    assert row.status == "rejected" and row.error_code == "source.path_refused"


def test_results_filter_by_status_and_verdict(stack, worker):
    submitted = stack.submit(str(stack.image(70)), str(stack.image(71)))
    stack.wait_terminal([s["check_id"] for s in submitted])
    done = [
        json.loads(line) for line in run_item(stack.env, "results", "--status", "done", "--json").stdout.splitlines()
    ]
    assert {s["check_id"] for s in submitted} <= {row["id"] for row in done}
    assert all(row["status"] == "done" for row in done)
    verdict = done[0]["verdict"]
    same = run_item(stack.env, "results", "--verdict", verdict, "--json").stdout.splitlines()
    assert all(json.loads(line)["verdict"] == verdict for line in same)
    future = run_item(stack.env, "results", "--since", "2999-01-01T00:00:00", "--json").stdout
    assert future.strip() == ""


def test_status_counts_and_reconcile_command(stack, worker):
    counts = json.loads(run_item(stack.env, "status", "--json").stdout)
    assert set(counts) == {"queued", "running", "done", "rejected", "failed"} and counts["done"] >= 1
    assert "failed 0 abandoned checks" in run_item(stack.env, "reconcile").stdout
    assert run_item(stack.env, "status", "no-such-check", check_exit=1).stderr.startswith("no such check")


def test_a_worker_that_cannot_load_its_models_stops_with_a_clear_error(stack):
    env = {**stack.env, "ITEM_HEAD": str(stack.folder / "no-such-head.safetensors")}
    result = subprocess.run([str(ITEM), "worker"], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "cannot start" in result.stderr and "head.missing" in result.stderr
