"""Upgrading the head of a running service, for real: `item versions`, `item rescore`, workers, Redis, Postgres."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from pipeline.core.head import Head
from tests.integration.stack import Worker, make_stack, run_item
from worker.ledger.states import Priority

N = 8


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    yield from make_stack(postgres_url, tiny_store, tmp_path_factory.mktemp("rescore-stack"))


@pytest.fixture(scope="module")
def checked(stack) -> list:
    """N uploads checked by a worker on the first head, which is then stopped."""
    worker = Worker(stack, "worker-v1")
    try:
        submitted = stack.submit(*(str(stack.image(seed)) for seed in range(N)))
        rows = stack.wait_terminal([s["check_id"] for s in submitted])
    finally:
        worker.stop()
    assert all(row.status == "done" for row in rows.values())
    return list(rows.values())


def _head_with_threshold(stack, name: str, threshold: float) -> dict:
    """The same weights with another threshold: scores stay, so the flips are known beforehand."""
    head = Head.load(stack.settings.head)
    path = head.__class__(head.module, replace(head.metadata, threshold=threshold)).save(stack.folder / name)
    return {**stack.env, "ITEM_HEAD": str(path)}


def _rescore(env: dict, *args: str) -> dict:
    return json.loads(run_item(env, "rescore", "--json", "--timeout", "60", *args).stdout)


def test_a_head_upgrade_is_rescored_by_the_head_alone(stack, checked):
    scores = sorted(row.p_fake for row in checked)
    threshold = (scores[N // 2 - 1] + scores[N // 2]) / 2
    env = _head_with_threshold(stack, "head-v2.safetensors", threshold)

    registered = json.loads(run_item(env, "versions", "register", "--json").stdout)
    versions = [json.loads(line) for line in run_item(env, "versions", "--json").stdout.splitlines()]
    assert [v["active"] for v in versions] == [False, True] and versions[1]["id"] == registered["id"]
    assert list(versions[1]["changed"]) == ["head"]  # stage by stage: only the head differs

    worker = Worker(stack, "worker-v2", env=env)
    try:
        summary = _rescore(env)
        again = _rescore(env)
    finally:
        worker.stop()

    assert summary["version"] == registered["id"] and summary["selected"] == summary["created"] == N
    assert summary["statuses"]["done"] == N and summary["complete"]
    assert worker.model_images() == 0  # no image decoded, so no caption, grounding or CLIP ran
    flipped = sum(row.verdict != ("fake" if row.p_fake >= threshold else "real") for row in checked)
    assert flipped > 0 and summary["flipped"] == flipped and summary["compared"] == N
    assert (again["created"], again["queued"], again["already_done"]) == (0, 0, N)  # a second run does nothing


def test_fresh_uploads_are_served_before_a_waiting_rescore(stack, checked):
    env = _head_with_threshold(stack, "head-v3.safetensors", 0.123)  # a third, new version
    run_item(env, "versions", "register")
    queued = _rescore(env, "--no-wait")  # no worker yet: the re-scores wait in the ledger
    assert queued["queued"] >= N
    run_item(env, "submit", str(stack.image(100)), str(stack.image(101)))

    worker = Worker(stack, "worker-v3", env=env)
    try:
        summary = _rescore(env)  # resumes: waits for the queued ones
    finally:
        worker.stop()
    assert summary["statuses"]["done"] == summary["selected"]

    with stack.ledger.session() as session:
        rescored = stack.ledger.list_checks(session, limit=1000)
    version = summary["version"]
    rescores = [r for r in rescored if r.pipeline_version_id == version and r.priority == Priority.rescore]
    uploads = [r for r in rescored if r.pipeline_version_id == version and r.priority == Priority.fresh]
    assert len(uploads) == 2 and all(r.status == "done" for r in uploads)
    assert max(r.started_at for r in uploads) <= min(r.started_at for r in rescores)
