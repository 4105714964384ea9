"""A drain as Kubernetes does it: SIGTERM to the worker's main process only, then SIGKILL after the grace period.

Through real `item worker` processes: the GPU loop finishes the batch in its models and gives back the batch it
had claimed and prepared (queued, claimable at once, its attempt not counted), no check is left `running` to wait
out its lease, the loop's presence row is deleted and the worker exits 0, well within the grace; the intake
acknowledges no message it has not filed. A GPU process the fleet has to kill has its checks given back at once.
"""

from __future__ import annotations

import base64
import json
import multiprocessing
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import timedelta

import pytest
import sqlalchemy as sa

from tests.conftest import encode, noise_image
from tests.integration.stack import Worker, make_stack
from worker.gpu import faults
from worker.gpu.processes import GpuFleet
from worker.intake.filing import CheckRequest, Intake
from worker.ledger.claims import owner_of
from worker.ledger.models import CheckRow, PipelineVersionRow, WorkerRow, utcnow
from worker.ops.reconciler import reconcile

BUDGET_S = 12  # the batch time budget: small, yet far above a tiny batch even on a loaded machine
IN_THE_MODELS_S = 3  # how long the first batch's model call lasts: long enough to send the SIGTERM meanwhile


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory):
    yield from make_stack(
        postgres_url,
        tiny_store,
        tmp_path_factory.mktemp("drain"),
        ITEM_BATCH_SIZE="4",
        ITEM_BATCH_TIME_BUDGET_S=str(BUDGET_S),
        ITEM_LEASE_S="60",  # a check left running would stay so for the whole test: the drain must give it back
        ITEM_RECONCILE_AFTER_S="120",
    )


@pytest.fixture
def armory(stack):
    folder = stack.folder / f"faults-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    return folder


def _arm(armory, point: str, fault: str) -> None:
    (armory / f"{point}.tmp").write_text(fault)
    (armory / f"{point}.tmp").rename(armory / point)


def _file(stack, seeds: range) -> list[str]:
    """Checks filed straight into the ledger, in one transaction: every one claimable at the same moment."""
    requests = [CheckRequest(f"drain-{seed}", {"path": str(stack.image(seed))}) for seed in seeds]
    return [one.check.id for one in Intake(stack.settings, stack.ledger).file(requests)]


def _rows(stack, ids: list[str]) -> list[CheckRow]:
    with stack.ledger.session() as session:
        return list(session.scalars(sa.select(CheckRow).where(CheckRow.id.in_(ids))))


def _until(condition, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (result := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.05)
    return result


def _two_batches_held(stack, ids: list[str], armory, gpu_pid: int) -> dict[str, list[CheckRow]]:
    """Once the first batch is in the models (the fault struck it) and the second is claimed too: checks by lease."""
    struck = armory / f"models.struck.{gpu_pid}"
    rows = _rows(stack, ids)
    by_token: dict[str, list[CheckRow]] = {}
    for row in rows:
        if row.status == "running":
            by_token.setdefault(row.lease_token, []).append(row)
    return by_token if struck.exists() and len(by_token) == 2 and sum(map(len, by_token.values())) == 8 else {}


def test_sigterm_finishes_the_batch_in_the_models_gives_back_the_one_in_hand_and_exits_0(stack, armory):
    worker = Worker(stack, "drained", env={**stack.env, faults.VARIABLE: str(armory)})
    gpu_pid = worker.gpu_pids()[-1]
    _arm(armory, "models", f"sleep {IN_THE_MODELS_S}")
    ids = _file(stack, range(4000, 4008))  # two batches of four

    # given one batch in the models and the next claimed (and prepared: local files, milliseconds) in hand
    held = _until(lambda: _two_batches_held(stack, ids, armory, gpu_pid), 30, "never held two batches")
    in_models, in_hand = sorted(held.values(), key=lambda rows: min(row.started_at for row in rows))
    time.sleep(0.3)  # the prefetch thread decodes its four small files

    # when the kubelet stops the pod: SIGTERM to the main process only
    os.kill(worker.process.pid, signal.SIGTERM)
    stopped = time.monotonic()
    try:
        status = worker.process.wait(BUDGET_S + 30)
    finally:
        worker.kill()
    assert status == 0, worker.log.read_text()[-3000:]
    assert time.monotonic() - stopped < BUDGET_S + 30

    # then nothing is left running: the batch in the models is done, the one in hand is queued and claimable now
    rows = {row.id: row for row in _rows(stack, ids)}
    assert {rows[row.id].status for row in in_models} == {"done"}
    given_back = [rows[row.id] for row in in_hand]
    now = utcnow()
    assert all(row.status == "queued" and row.attempts == 0 for row in given_back), given_back
    assert all(row.lease_expires_at is None and row.available_at <= now for row in given_back)
    with stack.ledger.session() as session:  # the loop's presence row went with it
        assert session.get(WorkerRow, f"{socket.gethostname()}:{gpu_pid}") is None
    log = worker.log.read_text()
    drain = (
        "stopping intake",
        "gave back 4 prefetched checks",
        "finished its batch of 4 checks",
        f"GPU process {gpu_pid} released its leases",
        f"GPU loop 0 (pid {gpu_pid}) exited with status 0",
        "item worker stopped; exiting (status 0)",
    )
    for step in drain:
        assert step in log, step

    # and a worker started afterwards finishes everything, the given-back checks on their first attempt
    after = Worker(stack, "after-drain")
    try:
        finished = stack.wait_terminal(ids, timeout=30)
    finally:
        after.stop()
    assert {row.status for row in finished.values()} == {"done"}
    assert {finished[row.id].attempts for row in in_hand} == {1}


MESSAGES = 600  # pushed while the intake runs: a SIGTERM lands with messages in every stage of it
PNG = base64.b64encode(encode(noise_image(12))).decode()


def _push(stack, external_ids: list[str]) -> None:
    """LPUSHes the messages in small bursts, as a busy platform would, for over a second: the SIGTERM lands while
    they still arrive, whatever the machine's load."""
    for start in range(0, len(external_ids), 20):
        for external_id in external_ids[start : start + 20]:
            stack.push_raw({"external_id": external_id, "image": {"b64": PNG}})
        time.sleep(0.04)


def _filed(stack, prefix: str) -> list[str]:
    with stack.ledger.session() as session:
        return list(session.scalars(sa.select(CheckRow.external_id).where(CheckRow.external_id.like(f"{prefix}%"))))


def _in_the_broker(stack) -> list[str]:
    """The external ids of every item.check message Redis still holds for this stack: queued, taken by a
    consumer, or unacknowledged."""
    raws = []
    for key in stack.redis.scan_iter(f"{stack.prefix}*"):
        kind = stack.redis.type(key)
        if kind == b"list":
            raws += stack.redis.lrange(key, 0, -1)
        elif kind == b"hash" and key.endswith(b"unacked"):
            raws += [json.dumps(json.loads(record)[0]).encode() for record in stack.redis.hvals(key)]
    ids = []
    for raw in raws:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") == "item.check":
            ids.append(json.loads(base64.b64decode(message["body"]))[1]["external_id"])
    return ids


@contextmanager
def _no_active_version(stack) -> Iterator[None]:
    """No version new checks could be filed under: the intake holds every batch (as through a ledger outage)."""
    with stack.ledger.session() as session:
        active = dict(session.execute(sa.select(PipelineVersionRow.id, PipelineVersionRow.activated_at)).tuples().all())
        session.execute(sa.update(PipelineVersionRow).values(activated_at=None))
    try:
        yield
    finally:
        with stack.ledger.session() as session:
            for version_id, activated_at in active.items():
                session.execute(
                    sa.update(PipelineVersionRow)
                    .where(PipelineVersionRow.id == version_id)
                    .values(activated_at=activated_at)
                )


# "filing": the SIGTERM lands while batches are filed and acknowledged. "holding": while the intake holds batches it
# cannot file yet (no version, or the ledger down), where acknowledging a message before filing it would lose it.
@pytest.mark.parametrize("intake", ["filing", "holding"])
def test_sigterm_during_intake_acknowledges_nothing_it_has_not_filed(stack, intake):
    prefix = f"intake-drain-{intake}-"
    external_ids = [f"{prefix}{i}" for i in range(MESSAGES)]
    first = Worker(stack, f"intake-{intake}", concurrency=0)
    pusher = threading.Thread(target=_push, args=(stack, external_ids))
    with _no_active_version(stack) if intake == "holding" else nullcontext():
        pusher.start()
        try:
            if intake == "filing":
                _until(lambda: len(_filed(stack, prefix)) >= MESSAGES // 10, 30, "the intake filed nothing")
            else:
                first.wait_for("holding them", 30)
            os.kill(first.process.pid, signal.SIGTERM)  # mid-stream: messages queued, taken, buffered, being filed
            assert first.process.wait(30) == 0, first.log.read_text()[-3000:]
        finally:
            pusher.join()
            first.kill()

    # every message is filed, or still the broker's: none was acknowledged unfiled
    filed, held = _filed(stack, prefix), _in_the_broker(stack)
    assert len(filed) < MESSAGES, "the SIGTERM came too late to test anything"
    assert set(external_ids) - set(filed) - set(held) == set()
    assert "stopping intake" in first.log.read_text()

    # and a second worker files the rest, each message once
    second = Worker(stack, f"intake-after-{intake}", concurrency=0)
    try:
        _until(lambda: len(_filed(stack, prefix)) >= MESSAGES, 30, "the rest was never filed")
    finally:
        second.stop()
    filed = _filed(stack, prefix)
    assert sorted(filed) == sorted(external_ids)  # each external id once: redelivered messages were not filed twice


def _stubborn(ready) -> None:
    """A GPU process stuck past any grace: it ignores SIGTERM (a model call nothing interrupts)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready.set()
    time.sleep(120)


def test_a_gpu_process_killed_at_the_stop_has_its_checks_given_back_at_once(stack):
    context = multiprocessing.get_context("fork")  # the stub imports nothing: a fork starts it at once
    ready = context.Event()
    stuck = context.Process(target=_stubborn, args=(ready,), daemon=True)
    stuck.start()
    assert ready.wait(10)
    ids = _file(stack, range(4100, 4105))
    spent = stack.settings.max_attempts
    mine, other = owner_of(stuck.pid), "elsewhere:1"
    held = [(ids[0], mine, 1), (ids[1], mine, 2), (ids[2], mine, spent), (ids[3], other, 1), (ids[4], other, 1)]
    expires = utcnow() + timedelta(minutes=5)
    with stack.ledger.session() as session:
        for check_id, owner, attempts in held:
            session.execute(
                sa.update(CheckRow)
                .where(CheckRow.id == check_id)
                .values(status="running", attempts=attempts, lease_owner=owner, lease_token=uuid.uuid4().hex,
                        lease_expires_at=expires)
            )  # fmt: skip
    fleet = GpuFleet(stack.settings, 1)
    fleet.gpus[0].process, fleet.gpus[0].version_id = stuck, "pv-served"  # it had loaded, so it may have claimed

    fleet.stop(grace_s=0.5)  # as a cold shutdown: SIGTERM, a tiny grace, then SIGKILL

    assert stuck.exitcode == -signal.SIGKILL
    rows = {row.id: row for row in _rows(stack, ids)}
    now = utcnow()
    for check_id, attempts in ((ids[0], 1), (ids[1], 2)):  # claimable now, the attempt it was on still counted
        row = rows[check_id]
        assert (row.status, row.attempts, row.lease_expires_at) == ("queued", attempts, None), check_id
        assert row.available_at <= now
    # one that used every attempt is never claimed again: its lease ends now, for the reconciler to fail it
    assert rows[ids[2]].status == "running" and rows[ids[2]].lease_expires_at <= now
    assert reconcile(stack.settings, stack.ledger).failed == 1
    assert {(row.status, row.error_code) for row in _rows(stack, ids[2:3])} == {("failed", "check.stuck")}
    for check_id in ids[3:]:  # another process's lease is none of this worker's business
        assert (rows[check_id].status, rows[check_id].lease_expires_at) == ("running", expires)


def _clear_backlog(stack) -> None:
    """Ends what earlier tests of the module left unfinished (the intake tests file checks no GPU loop ran), so that
    the next worker's first batch is this test's."""
    with stack.ledger.session() as session:
        session.execute(
            sa.update(CheckRow)
            .where(CheckRow.status.in_(["queued", "running"]))
            .values(status="failed", error_code="test.cleared", finished_at=utcnow())
        )


def test_a_gpu_process_that_dies_holding_a_batch_has_it_given_back_at_once(stack, armory):
    _clear_backlog(stack)
    worker = Worker(stack, "crashing", env={**stack.env, faults.VARIABLE: str(armory)})
    try:
        gpu_pid = worker.gpu_pids()[-1]
        _arm(armory, "models", "sleep 30")
        ids = _file(stack, range(4200, 4204))  # ids of its own: the test before filed 4100-4104
        _until(lambda: (armory / f"models.struck.{gpu_pid}").exists(), 30, "the batch never reached the models")
        os.kill(gpu_pid, signal.SIGKILL)  # the kernel's out-of-memory killer, say
        killed = time.monotonic()
        # the lease is 60 s: done well before it could run out means the worker gave the batch back itself
        finished = stack.wait_terminal(ids, timeout=40)
    finally:
        worker.stop()
    assert time.monotonic() - killed < 45
    assert {row.status for row in finished.values()} == {"done"}
    assert {row.attempts for row in finished.values()} == {2}  # the attempt that died with the process counts
    assert f"gave back 4 checks GPU process {gpu_pid} still held" in worker.log.read_text()


def _probe(port: int, path: str) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())
    except OSError:
        return 0, {}  # not listening yet


def test_readiness_waits_for_the_models_and_liveness_never_fails_a_loading_worker(stack, armory):
    from tests.integration.brokers import free_port

    port = free_port()
    env = {**stack.env, faults.VARIABLE: str(armory), "ITEM_METRICS_PORT": str(port)}
    _arm(armory, "load", "sleep 8")  # a model load that takes long
    worker = Worker(stack, "loading", env=env, wait_ready=False)
    try:
        _until(lambda: _probe(port, "/healthz")[0] == 200, 60, "the metrics endpoint never came up")
        _until(lambda: list(armory.glob("load.struck.*")), 30, "the GPU process never started loading")
        status, body = _probe(port, "/readyz")
        assert (status, body) == (503, {"ready": False, "dead": ["gpu-loops"]})  # loading: not ready...
        assert _probe(port, "/healthz") == (200, {"alive": True})  # ...but alive: a liveness probe keeps it
        _until(lambda: _probe(port, "/readyz")[0] == 200, 60, "never ready after its models loaded")
        assert _probe(port, "/readyz") == (200, {"ready": True, "dead": []})
    finally:
        worker.stop()
