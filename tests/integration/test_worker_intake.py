"""The intake of a real worker: any client's message is a ledger row within a second, whatever the GPU loop is
doing; what cannot be a check is a dead letter; and a worker on a new version takes no fresh upload until
that version is activated."""

from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import replace

import pytest
import sqlalchemy as sa

from pipeline.core.head import Head
from tests.conftest import encode, noise_image
from tests.integration.stack import Worker, make_stack, run_item
from worker.ledger.models import CheckRow

PNG = base64.b64encode(encode(noise_image(11))).decode()


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    yield from make_stack(
        postgres_url,
        tiny_store,
        tmp_path_factory.mktemp("intake"),
        ITEM_FETCH_ALLOWED_NETWORKS=json.dumps(["127.0.0.1/32"]),
        ITEM_FETCH_TIMEOUT_S="60",
        ITEM_BATCH_READ_WAIT_S="60",  # a batch waits for every download: a hung one holds it, as a hung stage would
        ITEM_BATCH_TIME_BUDGET_S="20",
        ITEM_BATCH_SIZE="1",
        ITEM_MAX_ATTEMPTS="1",
    )


@pytest.fixture(scope="module")
def worker(stack):
    process = Worker(stack, "intake")
    yield process
    process.stop()


def _row(stack, external_id: str) -> CheckRow | None:
    with stack.ledger.session() as session:
        return session.scalar(sa.select(CheckRow).where(CheckRow.external_id == external_id))


def _wait_row(stack, external_id: str, timeout: float, terminal: bool = False) -> CheckRow | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = _row(stack, external_id)
        if row is not None and (not terminal or row.status in ("done", "rejected", "failed")):
            return row
        time.sleep(0.02)
    return None


def test_a_message_is_filed_within_a_second_while_the_gpu_loop_is_busy(stack, worker, images):
    hung = stack.submit(f"{images.url}/hang.png", "-e", "busy-loop")[0]["check_id"]
    deadline = time.monotonic() + 30
    while (row := _row(stack, "busy-loop")) is None or row.status != "running":  # the loop is stuck on it
        assert time.monotonic() < deadline, "the hung check was never claimed"
        time.sleep(0.1)
    sent = time.monotonic()
    stack.send(external_id="while-busy", image={"b64": PNG})
    filed = _wait_row(stack, "while-busy", timeout=5)
    latency = time.monotonic() - sent
    assert filed is not None and filed.status == "queued"
    assert latency < 1.0, f"filed after {latency:.2f}s"
    assert _row(stack, "busy-loop").status == "running"  # still busy: the intake did not wait for it
    assert _wait_row(stack, "while-busy", timeout=60, terminal=True).status == "done"
    assert stack.wait_terminal([hung], timeout=60)[hung].error_code == "check.timeout"


@pytest.mark.parametrize(
    ("kwargs", "task", "args", "code"),
    [
        ({"image": {"b64": PNG}}, "item.check", None, "message.no_external_id"),
        ({"external_id": 1234, "image": {"b64": PNG}}, "item.check", None, "message.no_external_id"),
        ({"external_id": "x" * 513, "image": {"b64": PNG}}, "item.check", None, "message.no_external_id"),
        ({"external_id": "other-task", "image": {"b64": PNG}}, "tasks.add", None, "message.unknown_task"),
    ],
)
def test_a_message_without_a_usable_external_id_is_a_dead_letter(stack, worker, kwargs, task, args, code):
    before = len(_dead_letters(stack))
    stack.push_raw(kwargs, task=task, args=args)
    deadline = time.monotonic() + 10
    while len(letters := _dead_letters(stack)) == before:
        assert time.monotonic() < deadline, "no dead letter was recorded"
        time.sleep(0.1)
    assert letters[0]["code"] == code and letters[0]["body"]
    assert stack.queue_length() == 0  # acknowledged, not delivered again


def _dead_letters(stack) -> list[dict]:
    return [json.loads(line) for line in run_item(stack.env, "deadletters", "--json").stdout.splitlines()]


@pytest.mark.parametrize(
    ("external_id", "kwargs", "code"),
    [
        ("unknown-argument", {"image": {"b64": PNG}, "colour": "red"}, "message.invalid"),
        ("blob-by-hash", {"image": {"blob": "a" * 64}}, "source.invalid"),  # only the ledger may name stored bytes
        ("no-image", {}, "source.invalid"),
    ],
)
def test_a_malformed_message_with_a_usable_id_gets_a_rejected_row(stack, worker, external_id, kwargs, code):
    stack.push_raw({"external_id": external_id, **kwargs})
    row = _wait_row(stack, external_id, timeout=10, terminal=True)
    assert row is not None and (row.status, row.error_code) == ("rejected", code)


def test_a_pickled_message_is_refused_unread_and_kept_as_a_dead_letter(stack, worker):
    marker = stack.folder / "pwned"
    payload = f"cos\nsystem\n(S'touch {marker}'\ntR.".encode()  # protocol-0 pickle of os.system("touch ...")
    message = {
        "body": base64.b64encode(payload).decode(),
        "content-encoding": "binary",
        "content-type": "application/x-python-serialize",
        "headers": {"lang": "py", "task": "item.check", "id": str(uuid.uuid4()), "retries": 0},
        "properties": {
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": "item.checks"},
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    stack.push_message(message)
    deadline = time.monotonic() + 10
    while not any(letter["code"] == "message.not_json" for letter in _dead_letters(stack)):
        assert time.monotonic() < deadline, "the pickle left no dead letter"
        time.sleep(0.2)
    assert not marker.exists()
    good = stack.submit(str(stack.image(31)))[0]
    assert stack.wait_terminal([good["check_id"]])[good["check_id"]].status == "done"  # still serving


def test_a_worker_on_a_new_head_takes_no_fresh_upload_until_activated(stack, worker):
    head = Head.load(stack.settings.head)
    new_head = Head(head.module, replace(head.metadata, threshold=0.321))
    env = {**stack.env, "ITEM_HEAD": str(new_head.save(stack.folder / "canary.safetensors"))}
    canary = Worker(stack, "canary", env=env)
    try:
        canary.wait_for(r"registered, NOT active", 5)
        with stack.ledger.session() as session:
            active = stack.ledger.active_version(session).id
        before = [s["check_id"] for s in stack.submit(*(str(stack.image(700 + i)) for i in range(3)))]
        rows = stack.wait_terminal(before)
        assert {row.pipeline_version_id for row in rows.values()} == {active}  # the canary took none

        new_version = canary.version_id()
        assert new_version != active
        run_item(stack.env, "versions", "activate", new_version)
        after = [s["check_id"] for s in stack.submit(*(str(stack.image(710 + i)) for i in range(3)))]
        rows = stack.wait_terminal(after)
        assert {row.pipeline_version_id for row in rows.values()} == {new_version}
        assert {row.status for row in rows.values()} == {"done"}  # served by the canary, the one worker of it
    finally:
        canary.stop()
        run_item(stack.env, "versions", "activate", active)
