"""A batch costs the ledger a fixed number of statements, whatever its size (real PostgreSQL, real models).

Every statement the worker sends between claiming a batch and storing it is counted with SQLAlchemy's cursor
events, for a batch of one check and for a batch of 32, in each of the shapes a batch takes: fresh inline
images with a callback and the results stream (blobs, images, thumbnails, artifacts, results, deliveries), bytes
already checked (answered from the earlier result; their thumbnails offered again, one INSERT that keeps what is
there), undecodable inputs (rejected), and a head-only re-score (stored features, no decoding).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import event

from pipeline.core.detector import Detector
from pipeline.core.profiles import get_profile
from tests.conftest import encode, noise_image, random_head
from worker import rescore
from worker.gpu.batches import CheckService
from worker.intake.filing import CheckRequest, Intake
from worker.ledger import migrate
from worker.ledger.states import CheckStatus
from worker.ledger.store import Lease, Ledger, RescoreSelection
from worker.settings import Settings

SIZES = (1, 32)


@pytest.fixture(scope="module")
def ledger(postgres_url) -> Iterator[Ledger]:
    migrate.upgrade(postgres_url)
    ledger = Ledger(postgres_url)
    yield ledger
    ledger.dispose()


def _service(ledger: Ledger, tiny_store, seed: int) -> CheckService:
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    detector.use_head(random_head(detector, seed=seed))
    settings = Settings(
        batch_size=max(SIZES), batch_max_wait_s=0, rescore_batch_size=max(SIZES), results_stream="item:results",
        database_url="sqlite://",
    )  # fmt: skip
    service = CheckService(settings, ledger, detector)
    service.register_version(activate=True)
    with ledger.session() as session:  # the tenants' weights, read once per 10 s and not per batch: read now
        service.fair_share.weights(session)
    return service


@contextmanager
def counting(ledger: Ledger) -> Iterator[list[str]]:
    statements: list[str] = []

    def count(_connection, _cursor, statement, *_args) -> None:
        statements.append(statement.split(None, 1)[0].upper())

    event.listen(ledger.engine, "before_cursor_execute", count)
    try:
        yield statements
    finally:
        event.remove(ledger.engine, "before_cursor_execute", count)


def _file(service: CheckService, prefix: str, images: list[bytes]) -> list[str]:
    requests = [
        CheckRequest(f"{prefix}-{i}", {"b64": base64.b64encode(data).decode()}, "https://platform.example/hook")
        for i, data in enumerate(images)
    ]
    return [one.check.id for one in Intake(service.settings, service.ledger).file(requests)]


def _run_one_batch(service: CheckService) -> tuple[list[str], int]:
    """Claims and runs one batch; returns the first words of its statements, and how many checks it held."""
    lease = Lease.new("test:1", 60)
    with counting(service.ledger) as statements:
        batch = service.claim_batch(lease)
        service.run_batch(batch, lease)
    return statements, len(batch)


def _statuses(service: CheckService, ids: list[str]) -> set[str]:
    with service.ledger.session() as session:
        return {row.status for row in service.ledger.checks_by_id(session, ids)}


def _images(first_seed: int, n: int) -> list[bytes]:
    return [encode(noise_image(seed)) for seed in range(first_seed, first_seed + n)]


def test_a_batch_of_32_costs_the_statements_of_a_batch_of_1(ledger, tiny_store):
    service = _service(ledger, tiny_store, seed=0)
    shapes: dict[str, dict[int, list[str]]] = {}
    for n in SIZES:
        fresh = _file(service, f"fresh{n}", _images(1000 * n, n))
        shapes.setdefault("fresh", {})[n], held = _run_one_batch(service)
        assert held == n and _statuses(service, fresh) == {CheckStatus.done}

        again = _file(service, f"again{n}", _images(1000 * n, n))  # the same bytes: answered, not run
        shapes.setdefault("duplicate bytes", {})[n], _ = _run_one_batch(service)
        assert _statuses(service, again) == {CheckStatus.done}

        junk = _file(service, f"junk{n}", [b"not an image %d" % i for i in range(n)])
        shapes.setdefault("undecodable", {})[n], _ = _run_one_batch(service)
        assert _statuses(service, junk) == {CheckStatus.rejected}

    upgraded = _service(ledger, tiny_store, seed=1)  # a new head: a re-score runs only the head
    for n in SIZES:
        selection = RescoreSelection(external_ids=tuple(f"fresh{n}-{i}" for i in range(n)))
        rescore.queue(ledger, selection, version_id=upgraded.version_id)
        shapes.setdefault("head-only re-score", {})[n], held = _run_one_batch(upgraded)
        assert held == n

    for shape, by_size in shapes.items():
        one, many = (by_size[n] for n in SIZES)
        assert len(one) == len(many), f"{shape}: {len(one)} statements for 1 check, {len(many)} for 32\n{many}"
        # 17: the review queue's insert joined the store's transaction; then the near-copy and bank lookups (one each
        # per tenant of the batch, after a SET LOCAL that keeps them on the GIN index) and the index's insert
        assert len(one) <= 17, f"{shape}: {one}"
