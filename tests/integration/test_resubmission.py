"""Resubmission over the broker, through a real worker on Redis and Postgres: a corrected resubmission replaces a
check that ended rejected and is scored; another image under the id of a done check is a dead letter
`check.conflict`, and the done check keeps its own result."""

from __future__ import annotations

import base64
import time

import pytest
import sqlalchemy as sa

from tests.conftest import encode, noise_image
from tests.integration.stack import Worker, make_stack
from worker.intake.client import submit
from worker.ledger.models import CheckRow, DeadLetterRow


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    yield from make_stack(postgres_url, tiny_store, tmp_path_factory.mktemp("resubmit"))


def _b64(seed: int) -> dict:
    return {"b64": base64.b64encode(encode(noise_image(seed, 40, 40), "PNG")).decode()}


def _row(stack, external_id: str) -> CheckRow | None:
    with stack.ledger.session() as session:
        return session.scalar(sa.select(CheckRow).where(CheckRow.external_id == external_id))


def _until(stack, external_id: str, ok, timeout_s: float = 60) -> CheckRow:
    deadline = time.monotonic() + timeout_s
    while (row := _row(stack, external_id)) is None or not ok(row):
        assert time.monotonic() < deadline, (external_id, row and row.status)
        time.sleep(0.1)
    return row


def test_a_corrected_resubmission_replaces_a_rejected_check_and_another_image_is_a_conflict(stack):
    worker = Worker(stack, "resubmit")
    try:
        stack.send(external_id="fix-me", image=_b64(1), callback_url="gopher://hooks.example/x")
        rejected = _until(stack, "fix-me", lambda row: row.status == "rejected")
        assert rejected.error_code == "callback.invalid"
        stack.send(external_id="fix-me", image=_b64(1))  # fixed: no callback
        done = _until(stack, "fix-me", lambda row: row.status == "done")
        assert done.id == rejected.id and done.error_code is None and done.p_fake is not None
        with stack.ledger.session() as session:
            session.execute(sa.delete(DeadLetterRow))
        stack.send(external_id="fix-me", image=_b64(2))  # another image under the id of a done check
        deadline = time.monotonic() + 30
        while not (letters := _letters(stack)):
            assert time.monotonic() < deadline, "no dead letter"
            time.sleep(0.1)
        assert [letter.code for letter in letters] == ["check.conflict"] and done.id in letters[0].reason
        after = _row(stack, "fix-me")
        assert (after.status, after.p_fake, after.image_sha256) == ("done", done.p_fake, done.image_sha256)
        # the Python client (`item submit`) says so too, and never shows the done check as this image's
        (answer,) = submit(stack.settings, [("fix-me", _b64(3))])
        assert (answer.status, answer.error_code, answer.created) == ("conflict", "check.conflict", False)
    finally:
        worker.stop()


def _letters(stack) -> list[DeadLetterRow]:
    with stack.ledger.session() as session:
        return list(session.scalars(sa.select(DeadLetterRow)))
