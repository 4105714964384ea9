"""The GPU loop: one per worker process, claiming batches of its pipeline version from the ledger.

    claim up to batch_size ready checks under a new lease, read and decode them  ─▶  run the models under the
    watchdog  ─▶  store results, artifacts and deliveries in one transaction

The three phases overlap across batches: while the models run batch k, a prefetch thread has claimed and
prepared batch k+1, and a store thread writes batch k-1; the models never wait on the ledger or the network
unless those are slower than the models. A heartbeat renews each batch's lease from its claim to its store.
At most one batch waits prepared, so a worker holds no more checks than it can start on next.

A worker that dies leaves its checks `running` under a lease nobody renews; once it expires any worker of the
version claims them again. Nothing is ever raised into model code (an exception landing inside `generate` or a
CUDA graph capture can leave the model or the device broken): reading is bounded by its own time limits, and a
batch still in the models past its budget is left to run while the watchdog records each of its unfinished
checks as `check.timeout` (retried) and ends the process, which the GPU step replaces. A CUDA error that leaves
the device unusable (illegal memory access, device-side assert, cuBLAS or cuDNN failures; not out-of-memory)
ends the process too: its batch is retried as `gpu.fault` by a fresh process. The prefetch, store and presence
threads are supervised (worker.ops.supervise): one that dies is logged, counted, and ends the process to be
replaced, its leases running out. The watchdog is in worker.gpu.watchdog, the exit statuses in worker.gpu.exits.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from contextlib import suppress

from pipeline.core.devices import is_sticky_cuda_error
from worker.gpu import exits, faults
from worker.gpu.batches import Batch, CheckService, TransientError
from worker.gpu.watchdog import WATCHDOG_EXIT_STATUS, Watchdog, end_process
from worker.ledger import reviews
from worker.ledger.claims import owner_of
from worker.ledger.engine import INFRASTRUCTURE_ERRORS
from worker.ledger.models import utcnow
from worker.ledger.store import Lease
from worker.ledger.wakeups import Listener
from worker.ops import metrics
from worker.ops.logs import OutageLog
from worker.ops.supervise import Supervised, lower_thread_priority, name_os_thread

log = logging.getLogger("item.worker")

WATCHDOG_GRACE_S = 30  # past the budget: a batch still preparing ends the process; a lease is no longer renewed
GPU_FAULT_EXIT_STATUS = exits.GPU_FAULT  # a CUDA error left the device unusable
FAULT_STOP_S = 5.0  # after a GPU fault, how long the prefetch and store threads get to finish before the exit
HEARTBEAT_S = 10.0  # how often a loop tells the ledger it is alive (the console's workers), one statement each


def owner_name() -> str:
    """Who holds a lease, for people reading the ledger: host and process id (the GPU step's parent names a killed
    process's leases the same way, to give them back)."""
    return owner_of(os.getpid())


class Renewal:
    """One batch's heartbeat: renews its lease every `every_s` on a thread of its own until stopped, or until
    its budget and the watchdog's grace are spent (whatever holds it then is stuck: the lease must run out)."""

    held: set[str] = set()  # the tokens of this process's leases being renewed now: `celery inspect item` shows it

    def __init__(self, service: CheckService, lease: Lease, checks: int, every_s: float, until: float):
        self.service, self.lease, self.checks, self.every_s, self.until = service, lease, checks, every_s, until
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._live, name="item-heartbeat", daemon=True)
        Renewal.held.add(lease.token)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)
        Renewal.held.discard(self.lease.token)

    def _live(self) -> None:
        """A heartbeat lives as long as its batch: a death is not restarted (the lease runs out and the checks are
        redone elsewhere), but it is logged and counted, as a supervised thread's is."""
        name_os_thread("item-heartbeat")
        try:
            self._renew()
        except BaseException:  # noqa: BLE001  (a bug: nothing inside is meant to escape)
            metrics.THREAD_DEATHS.labels("heartbeat").inc()
            log.critical("the heartbeat of lease %s crashed; the lease runs out and its checks are redone",
                         self.lease.token, exc_info=True)  # fmt: skip

    def _renew(self) -> None:
        while not self._done.wait(self.every_s) and time.monotonic() < self.until:
            try:
                with self.service.ledger.session() as session:
                    held = self.service.ledger.renew(session, self.lease)
            except Exception:  # the ledger is down: the lease may run out, and the checks are redone elsewhere
                log.warning("could not renew lease %s", self.lease.token, exc_info=True)
                continue
            if 0 < held < self.checks:  # none held: the batch was stored just before its heartbeat stopped
                log.warning("lease %s holds %d of its %d checks: the rest ended or were taken over",
                            self.lease.token, held, self.checks)  # fmt: skip
            self.checks = held


class Presence:
    """A loop's row in the ledger's `workers`, written at its start and every `every_s` on a thread of its own,
    and deleted when it stops: the console's list of live workers. A ledger outage only delays the next beat
    (a killed worker's row simply stops being seen)."""

    def __init__(self, service: CheckService, owner: str, every_s: float):
        self.service, self.owner, self.every_s = service, owner, every_s
        self.started_at = utcnow()
        self._done = threading.Event()
        self._thread = Supervised("presence", self._beat_until_done, stopping=self._done, on_death="exit")
        self._outage = OutageLog(log, "could not record this worker's heartbeat", "still no heartbeat recorded")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops beating, then deletes the row (after the last beat, which would otherwise bring it back)."""
        self._thread.stop(5)
        try:
            with self.service.ledger.session() as session:
                reviews.worker_gone(session, self.owner)
        except Exception:  # the row ages out of the console's list on its own
            log.warning("could not remove this worker's heartbeat", exc_info=True)

    def _beat_until_done(self) -> None:
        while True:
            self._beat()
            if self._done.wait(self.every_s):
                return

    def _beat(self) -> None:
        try:
            with self.service.ledger.session() as session:
                reviews.heartbeat(session, self.owner, self.service.version_id, self.started_at)
        except Exception:
            self._outage.failed()
        else:
            self._outage.recovered()


class Loop:
    """Claims and runs batches until `stop` is set. `exit_status` is what the process should end with (0: it
    was asked to stop; GPU_FAULT_EXIT_STATUS: the device failed)."""

    def __init__(self, service: CheckService, *, listener: Listener | None = None, stop: threading.Event | None = None):
        self.service = service
        self.settings = service.settings
        self.listener = listener or Listener(self.settings.session_database_url, service.version_id)
        self.stop = stop or threading.Event()
        self.owner = owner_name()
        self.batches = self.checks_run = 0
        self.exit_status = 0
        self._watchdog: Watchdog | None = None
        self._fault: BaseException | None = None  # the CUDA error that made the device unusable

    def counters(self) -> dict:
        """What this loop did so far and holds now, for `celery inspect item`."""
        return {"batches": self.batches, "checks": self.checks_run, "leases": len(Renewal.held)}

    def claim(self) -> Batch | None:
        """A new batch under a new lease, its heartbeat started; None when nothing is ready."""
        lease = Lease.new(self.owner, self.settings.lease_s)
        checks = self.service.claim_batch(lease)
        if not checks:
            return None
        budget = self.settings.batch_time_budget_s
        batch = Batch(checks, lease, time.monotonic() + budget)
        every = self.settings.lease_s / 3
        batch.renewal = Renewal(self.service, lease, len(checks), every, batch.deadline + WATCHDOG_GRACE_S)
        return batch

    def run_once(self) -> int:
        """Claims one batch and runs it through every phase in this thread; returns how many checks it held (0:
        nothing was ready). The embedded mode's loop, and the tests'.

        Here a batch past its budget does not end the process (it is a person's command, or a library call): the
        watchdog records its unfinished checks as `check.timeout` at the deadline, and what the models make after
        it is dropped. A GPU fault is recorded, then raised (`gpu.fault`): the command ends with it."""
        if self._watchdog is None:
            self._watchdog = Watchdog(self.service, end_process=False)
        batch = self.claim()
        if batch is None:
            return 0
        try:
            self.service.prepare(batch)
            if self._run_models(batch):
                self.service.store(batch)
        finally:
            batch.renewal.stop()
        fault, self._fault = self._fault, None
        if fault is not None:
            raise TransientError(_fault_message(fault), code="gpu.fault") from fault
        return len(batch.checks)

    def run_until(self, finished: Callable[[], bool], *, idle_s: float = 0.2) -> None:
        """Runs batches until `finished()` (the embedded mode: a person waits for their checks)."""
        while not finished():
            if not self.run_once():
                time.sleep(idle_s)

    def run_forever(self) -> None:
        """The worker's loop: the models run in this thread, batches are prepared and stored around them."""
        self._watchdog = Watchdog(self.service, end_process=True)
        prefetch, store = Prefetch(self), Store(self.service)
        presence = Presence(self.service, self.owner, HEARTBEAT_S)
        presence.start()
        prefetch.start()
        store.start()
        try:
            while not self.stop.is_set():
                self._run_next(prefetch, store)
        finally:
            self._drain(prefetch, store, presence)

    def _run_next(self, prefetch: Prefetch, store: Store) -> None:
        batch = prefetch.next(timeout_s=1.0)
        if batch is None:
            return
        if self._run_models(batch):
            store.put(batch)
        else:
            batch.renewal.stop()
        self.batches += 1
        self.checks_run += len(batch.checks)
        if self.stop.is_set() and not self.exit_status:  # a drain waited for this batch: say it is over
            log.info("stopping: finished its batch of %d checks in the models; storing it", len(batch.checks))

    def _drain(self, prefetch: Prefetch, store: Store, presence: Presence) -> None:
        """Claims no more, gives back the batch prepared but not run, stores what the models ran, then deletes the
        presence row. Each step is logged: a drain is what an operator watches during a rollout."""
        faulted = self.exit_status == GPU_FAULT_EXIT_STATUS
        prefetch.stop(FAULT_STOP_S if faulted else self.settings.batch_time_budget_s + WATCHDOG_GRACE_S)
        store.finish(FAULT_STOP_S if faulted else None)
        self._watchdog.stop()
        self.listener.close()
        presence.stop()
        if Renewal.held:  # a batch not stored in time: the worker gives its checks back once this process ends
            log.warning("stopped, still holding %d leases: the worker gives their checks back once this process ends",
                        len(Renewal.held))  # fmt: skip
        else:
            log.info("stopped: every batch stored or given back, leases released, presence removed")

    def _run_models(self, batch: Batch) -> bool:
        """The models on `batch`, watched; whether there is a result to store (a batch timed out or hit by a GPU
        fault has had its checks recorded already)."""
        if batch.left_s() <= 0:  # reading took the whole budget: the models are not started
            self._timed_out(batch)
            return False
        try:
            return self._watchdog.run(batch, lambda: self.service.run_models(batch))
        except Exception as error:  # run_models ends the checks of any other error itself
            if not is_sticky_cuda_error(error):
                raise
            self._gpu_fault(batch, error)
            return False

    def _timed_out(self, batch: Batch) -> None:
        log.error("batch of %d checks ran past its time budget while being read; its checks are retried",
                  len(batch.checks))  # fmt: skip
        batch.timed_out = True
        try:
            self.service.time_out(batch.checks, batch.lease)
        except INFRASTRUCTURE_ERRORS:  # nothing recorded: the lease runs out and the checks are redone
            log.warning("could not record the timeout of %d checks; they are redone after their lease",
                        len(batch.checks))  # fmt: skip

    def _gpu_fault(self, batch: Batch, error: BaseException) -> None:
        """The device is unusable for this process: the batch is retried as `gpu.fault` (an attempt of each check,
        as any claim), and the loop stops for the process to end with GPU_FAULT_EXIT_STATUS and be replaced."""
        ending = f"the process ends (status {GPU_FAULT_EXIT_STATUS}) to be replaced"
        log.critical("CUDA error, this process's GPU context is unusable: %s; the %d checks of its batch are "
                     "retried (gpu.fault) and %s", _first_line(error), len(batch.checks),
                     ending if self._watchdog.end_process else "this command ends", exc_info=error)  # fmt: skip
        self._fault, self.exit_status = error, GPU_FAULT_EXIT_STATUS
        self.stop.set()
        try:
            fault = TransientError(_fault_message(error), code="gpu.fault")
            self.service.fail(batch.checks, fault, batch.lease, stage="models")
        except INFRASTRUCTURE_ERRORS:
            log.warning("could not record the GPU fault of %d checks; they are redone after their lease",
                        len(batch.checks))  # fmt: skip


class Prefetch:
    """Claims and prepares the next batch (ledger reads, downloads, decoding) while the models run this one, on
    a supervised thread: one that dies ends the process (its batches' leases run out).

    It claims only when the model thread has taken the batch it prepared before, so at most one batch waits.
    """

    def __init__(self, loop: Loop):
        self.loop, self.service = loop, loop.service
        self._ready: queue.Queue[Batch] = queue.Queue(maxsize=1)
        self._taken = threading.Event()
        self._taken.set()
        self.preparing: Batch | None = None
        self._thread = Supervised("prefetch", self.run, stopping=loop.stop, on_death="exit")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float) -> None:
        """Stops the loop's claiming; waits up to `timeout_s` for the batch being prepared to be given back."""
        self._thread.stop(timeout_s)

    def next(self, timeout_s: float) -> Batch | None:
        """The next prepared batch, or None after `timeout_s`; ends the process if preparing one is stuck."""
        try:
            batch = self._ready.get(timeout=timeout_s)
        except queue.Empty:
            stuck = self.preparing
            if stuck is not None and stuck.left_s() < -WATCHDOG_GRACE_S:
                log.critical("batch of %d checks stuck in preparing past its time budget; its checks are retried "
                             "(check.timeout) and this process ends (status %d) to be replaced",
                             len(stuck.checks), WATCHDOG_EXIT_STATUS)  # fmt: skip
                end_process(WATCHDOG_EXIT_STATUS, lambda: self.service.time_out(stuck.checks, stuck.lease))
            return None
        self._taken.set()
        return batch

    def run(self) -> None:
        if self.service.models_off_the_cpu:
            lower_thread_priority()  # its reading threads too: the model thread comes first
        outage = OutageLog(
            log, "the ledger is unreachable; claimed checks wait out their lease and are redone",
            "the ledger is still unreachable",
        )  # fmt: skip
        stop = self.loop.stop
        while not stop.is_set():
            if not self._taken.wait(0.5):
                continue
            try:
                batch = self._claim_and_prepare()
                outage.recovered()
            except INFRASTRUCTURE_ERRORS:
                outage.failed()
                stop.wait(min(5.0, self.loop.settings.idle_poll_s))
                continue
            except Exception:  # a bug in claiming: this thread must live on, or the models would wait forever
                log.exception("claiming a batch crashed")
                stop.wait(min(5.0, self.loop.settings.idle_poll_s))
                continue
            if batch is None:
                self.loop.listener.wait(self.loop.settings.idle_poll_s)
            elif stop.is_set():
                self._release(batch)
            else:
                self._taken.clear()
                self._ready.put(batch)
        self._release_waiting()

    def _claim_and_prepare(self) -> Batch | None:
        batch = self.loop.claim()
        if batch is None:
            return None
        self.preparing = batch
        try:
            self.service.prepare(batch)
        except INFRASTRUCTURE_ERRORS:
            batch.renewal.stop()  # its checks wait out their lease and are claimed again
            raise
        except Exception as error:  # a bug: the batch is retried (and failed once attempts run out)
            log.exception("preparing a batch of %d checks crashed", len(batch.checks))
            crash = TransientError(f"Internal error: {error!r}", code="check.internal_error")
            self.service.fail(batch.checks, crash, batch.lease, stage="prepare")
            batch.renewal.stop()
            return None
        finally:
            self.preparing = None
        return batch

    def _release(self, batch: Batch) -> None:
        """A stopping worker gives back what it prepared but will not run: claimable at once, attempt unused."""
        try:
            given = self.service.release(batch)
            log.info("gave back %d prefetched checks: claimable at once, their attempt not counted", given)
        except INFRASTRUCTURE_ERRORS:
            log.warning("could not give back %d prefetched checks; their lease runs out", len(batch.checks))
        finally:
            batch.renewal.stop()

    def _release_waiting(self) -> None:
        with suppress(queue.Empty):
            self._release(self._ready.get_nowait())


class Store:
    """Stores finished batches, one at a time and in order, off the model thread, on a supervised thread: one
    that dies ends the process (the batches it held run out their leases and are redone)."""

    def __init__(self, service: CheckService):
        self.service = service
        self._batches: queue.Queue[Batch | None] = queue.Queue(maxsize=1)  # one waits: the models run on
        self._finishing = threading.Event()
        self._thread = Supervised("store", self.run, stopping=self._finishing, on_death="exit")

    def start(self) -> None:
        self._thread.start()

    def put(self, batch: Batch) -> None:
        self._batches.put(batch)

    def finish(self, timeout_s: float | None = None) -> None:
        """Stores what was handed over (waiting up to `timeout_s`), then ends."""
        self._finishing.set()
        self._batches.put(None)
        self._thread.stop(timeout_s)

    def run(self) -> None:
        if self.service.models_off_the_cpu:
            lower_thread_priority()
        while (batch := self._batches.get()) is not None:
            faults.strike("store")  # tests only: a death of this thread (worker.gpu.faults)
            try:
                self.service.store(batch)
            except INFRASTRUCTURE_ERRORS:  # nothing recorded: the lease runs out and the checks are redone
                log.warning("could not store a batch of %d checks; they are redone after their lease",
                            len(batch.checks))  # fmt: skip
            except Exception:
                log.exception("storing a batch of %d checks crashed; they are redone after their lease",
                              len(batch.checks))  # fmt: skip
            finally:
                batch.renewal.stop()


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _fault_message(error: BaseException) -> str:
    return f"The GPU failed while running this check's batch ({_first_line(error)}); it is retried by a fresh process."
