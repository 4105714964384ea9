"""Time budgets and internal image servers, through a real worker.

This stack allows 127.0.0.1 as an "internal CDN" (ITEM_FETCH_ALLOWED_NETWORKS) and lets a fetch run longer
than a check may, so a server that never finishes shows what a hung stage does: the check is ended by its
time budget, retried, then failed, while the worker goes on serving.
"""

from __future__ import annotations

import json

import pytest

from tests.integration.stack import Worker, make_stack


@pytest.fixture(scope="module")
def server(images):
    return images.url


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    yield from make_stack(
        postgres_url,
        tiny_store,
        tmp_path_factory.mktemp("limits"),
        ITEM_FETCH_ALLOWED_NETWORKS=json.dumps(["127.0.0.1/32"]),
        ITEM_FETCH_TIMEOUT_S="60",
        ITEM_BATCH_READ_WAIT_S="60",  # a batch waits for every download: a hung one holds it, as a hung stage would
        ITEM_MAX_ATTEMPTS="2",
    )


@pytest.fixture(scope="module")
def worker(stack):
    process = Worker(stack, "limits")
    yield process
    process.stop()


def test_url_from_an_allowed_internal_server(stack, worker, server):
    row = next(iter(stack.wait_terminal([stack.submit(f"{server}/image.png")[0]["check_id"]]).values()))
    assert row.status == "done" and row.image_sha256


def test_missing_url_is_rejected_as_4xx(stack, worker, server):
    row = next(iter(stack.wait_terminal([stack.submit(f"{server}/nope.png")[0]["check_id"]]).values()))
    assert row.status == "rejected" and row.error_code == "url.http_4xx"


def test_a_hung_check_is_ended_by_its_budget_and_the_worker_keeps_serving(stack, worker, server):
    hung = stack.submit(f"{server}/hang.png", "-e", "hung")[0]["check_id"]
    row = stack.wait_terminal([hung], timeout=90)[hung]
    assert row.status == "failed" and row.error_code == "check.timeout" and row.attempts == 2
    after = stack.submit(str(stack.image(60)))[0]["check_id"]
    assert stack.wait_terminal([after])[after].status == "done"
    assert worker.process.poll() is None
