"""The GPU loop: one per worker process, claiming batches of its pipeline version from the ledger.

    claim up to batch_size ready checks under a new lease, read and decode them  ─▶  run the models within the
    batch's time budget  ─▶  store results, artifacts and deliveries in one transaction

The three phases overlap across batches: while the models run batch k, a prefetch thread has claimed and
prepared batch k+1, and a store thread writes batch k-1; the models never wait on the ledger or the network
unless those are slower than the models. A heartbeat renews each batch's lease from its claim to its store.
At most one batch waits prepared, so a worker holds no more checks than it can start on next.

A worker that dies leaves its checks `running` under a lease nobody renews; once it expires any worker of the
version claims them again. A batch past its budget is interrupted wherever it is, the models included, and each
of its unfinished checks is retried as `check.timeout`; if the interruption cannot land (the thread is stuck
inside native code), a watchdog records the timeouts and ends the process, which the GPU step replaces.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from worker.gpu.batches import Batch, BatchTimeout, CheckService, TransientError
from worker.ledger import reviews
from worker.ledger.engine import INFRASTRUCTURE_ERRORS
from worker.ledger.models import utcnow
from worker.ledger.store import Lease
from worker.ledger.wakeups import Listener
from worker.ops.logs import OutageLog

log = logging.getLogger("item.worker")

WATCHDOG_GRACE_S = 30  # after the budget, how long the interruption may take before the process is ended
WATCHDOG_EXIT_STATUS = 70  # EX_SOFTWARE: the GPU step (worker.gpu.processes) replaces the process
HEARTBEAT_S = 10.0  # how often a loop tells the ledger it is alive (the console's workers), one statement each


def owner_name() -> str:
    """Who holds a lease, for people reading the ledger: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


class Renewal:
    """One batch's heartbeat: renews its lease every `every_s` on a thread of its own until stopped, or until
    its budget and the watchdog's grace are spent (whatever holds it then is stuck: the lease must run out)."""

    held: set[str] = set()  # the tokens of this process's leases being renewed now: `celery inspect item` shows it

    def __init__(self, service: CheckService, lease: Lease, checks: int, every_s: float, until: float):
        self.service, self.lease, self.checks, self.every_s, self.until = service, lease, checks, every_s, until
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="item-heartbeat", daemon=True)
        Renewal.held.add(lease.token)
        self._thread.start()

    def stop(self) -> None:
        self._done.set()
        self._thread.join(5)
        Renewal.held.discard(self.lease.token)

    def _renew(self) -> None:
        while not self._done.wait(self.every_s) and time.monotonic() < self.until:
            try:
                with self.service.ledger.session() as session:
                    held = self.service.ledger.renew(session, self.lease)
            except Exception:  # the ledger is down: the lease may run out, and the checks are redone elsewhere
                log.warning("could not renew lease %s", self.lease.token, exc_info=True)
                continue
            if held < self.checks:
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
        self._thread = threading.Thread(target=self._beat_until_done, name="item-presence", daemon=True)
        self._outage = OutageLog(log, "could not record this worker's heartbeat", "still no heartbeat recorded")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stops beating, then deletes the row (after the last beat, which would otherwise bring it back)."""
        self._done.set()
        self._thread.join(5)
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
    """Claims and runs batches until `stop` is set."""

    def __init__(self, service: CheckService, *, listener: Listener | None = None, stop: threading.Event | None = None):
        self.service = service
        self.settings = service.settings
        self.listener = listener or Listener(self.settings.database_url, service.version_id)
        self.stop = stop or threading.Event()
        self.owner = owner_name()
        self.batches = self.checks_run = 0

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
        nothing was ready). The embedded mode's loop, and the tests'."""
        batch = self.claim()
        if batch is None:
            return 0
        try:
            with _budget(batch.left_s(), batch.checks, batch.lease, self.service):
                self.service.prepare(batch)
                self.service.run_models(batch)
                self.service.store(batch)
        except BatchTimeout:  # the checks it finished are left as they are: only those still held are retried
            self._timed_out(batch)
        finally:
            batch.renewal.stop()
        return len(batch.checks)

    def run_until(self, finished: Callable[[], bool], *, idle_s: float = 0.2) -> None:
        """Runs batches until `finished()` (the embedded mode: a person waits for their checks)."""
        while not finished():
            if not self.run_once():
                time.sleep(idle_s)

    def run_forever(self) -> None:
        """The worker's loop: the models run in this thread, batches are prepared and stored around them."""
        prefetch, store = Prefetch(self), Store(self.service)
        presence = Presence(self.service, self.owner, HEARTBEAT_S)
        presence.start()
        prefetch.start()
        store.start()
        try:
            while not self.stop.is_set():
                batch = prefetch.next(timeout_s=1.0)
                if batch is not None:
                    self._run_models(batch)
                    store.put(batch)
                    self.batches += 1
                    self.checks_run += len(batch.checks)
        finally:
            prefetch.join(self.settings.batch_time_budget_s + WATCHDOG_GRACE_S)
            store.finish()
            self.listener.close()
            presence.stop()

    def _run_models(self, batch: Batch) -> None:
        try:
            if batch.left_s() <= 0:
                raise BatchTimeout()
            with _budget(batch.left_s(), batch.checks, batch.lease, self.service):
                self.service.run_models(batch)
        except BatchTimeout:
            batch.timed_out = True
            try:
                self._timed_out(batch)
            except INFRASTRUCTURE_ERRORS:  # nothing recorded: the lease runs out and the checks are redone
                log.warning("could not record the timeout of %d checks; they are redone after their lease",
                            len(batch.checks))  # fmt: skip

    def _timed_out(self, batch: Batch) -> None:
        log.error("batch of %d checks ran past its time budget; its unfinished checks are retried", len(batch.checks))
        self.service.time_out(batch.checks, batch.lease)


class Prefetch(threading.Thread):
    """Claims and prepares the next batch (ledger reads, downloads, decoding) while the models run this one.

    It claims only when the model thread has taken the batch it prepared before, so at most one batch waits.
    """

    def __init__(self, loop: Loop):
        super().__init__(name="item-prefetch", daemon=True)
        self.loop, self.service = loop, loop.service
        self._ready: queue.Queue[Batch] = queue.Queue(maxsize=1)
        self._taken = threading.Event()
        self._taken.set()
        self.preparing: Batch | None = None

    def next(self, timeout_s: float) -> Batch | None:
        """The next prepared batch, or None after `timeout_s`; ends the process if preparing one is stuck."""
        try:
            batch = self._ready.get(timeout=timeout_s)
        except queue.Empty:
            stuck = self.preparing
            if stuck is not None and stuck.left_s() < -WATCHDOG_GRACE_S:
                _give_up(stuck.checks, stuck.lease, self.service)
            return None
        self._taken.set()
        return batch

    def run(self) -> None:
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
            self.service.release(batch)
        except INFRASTRUCTURE_ERRORS:
            log.warning("could not give back %d prefetched checks; their lease runs out", len(batch.checks))
        finally:
            batch.renewal.stop()

    def _release_waiting(self) -> None:
        with suppress(queue.Empty):
            self._release(self._ready.get_nowait())


class Store(threading.Thread):
    """Stores finished batches, one at a time and in order, off the model thread."""

    def __init__(self, service: CheckService):
        super().__init__(name="item-store", daemon=True)
        self.service = service
        self._batches: queue.Queue[Batch | None] = queue.Queue(maxsize=1)  # one waits: the models run on

    def put(self, batch: Batch) -> None:
        self._batches.put(batch)

    def finish(self) -> None:
        """Stores what was handed over, then ends."""
        self._batches.put(None)
        self.join()

    def run(self) -> None:
        while (batch := self._batches.get()) is not None:
            try:
                if not batch.timed_out:
                    self.service.store(batch)
            except INFRASTRUCTURE_ERRORS:  # nothing recorded: the lease runs out and the checks are redone
                log.warning("could not store a batch of %d checks; they are redone after their lease",
                            len(batch.checks))  # fmt: skip
            except Exception:
                log.exception("storing a batch of %d checks crashed; they are redone after their lease",
                              len(batch.checks))  # fmt: skip
            finally:
                batch.renewal.stop()


@contextmanager
def _budget(seconds: float, batch, lease: Lease, service: CheckService) -> Iterator[None]:
    """Raises BatchTimeout in this thread after `seconds`; if that cannot land within WATCHDOG_GRACE_S, records
    the timeouts from another thread and ends the process."""
    thread = threading.get_ident()
    alarm = _Alarm(seconds, thread)
    watchdog = threading.Timer(seconds + WATCHDOG_GRACE_S, _give_up, (batch, lease, service))
    watchdog.daemon = True
    alarm.start()
    watchdog.start()
    try:
        yield
    finally:
        alarm.cancel()
        watchdog.cancel()


class _Alarm:
    """SIGALRM in the main thread (it interrupts blocking calls too); an asynchronous exception elsewhere."""

    def __init__(self, seconds: float, thread: int):
        self.seconds = seconds
        self.thread = thread
        self.main = thread == threading.main_thread().ident
        self._timer: threading.Timer | None = None
        self._previous = None
        self._lock = threading.Lock()
        self._cancelled = False

    def start(self) -> None:
        if self.main:
            self._previous = signal.signal(signal.SIGALRM, _raise_timeout)
            signal.setitimer(signal.ITIMER_REAL, self.seconds)
        else:
            self._timer = threading.Timer(self.seconds, self._fire)
            self._timer.daemon = True
            self._timer.start()

    def _fire(self) -> None:
        with self._lock:
            if not self._cancelled:
                _async_raise(self.thread, BatchTimeout)

    def cancel(self) -> None:
        if self.main:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, self._previous or signal.SIG_DFL)
        elif self._timer is not None:
            with self._lock:  # a timeout raised but not yet delivered must not land after the batch
                self._cancelled = True
                self._timer.cancel()
                _async_raise(self.thread, None)


def _raise_timeout(signum, frame) -> None:
    raise BatchTimeout()


def _async_raise(thread: int, exception: type[BaseException] | None) -> None:
    """Raises `exception` in `thread` at its next bytecode (None: forgets one raised there but not yet seen)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread), ctypes.py_object(exception) if exception is not None else None
    )


def _give_up(batch, lease: Lease, service: CheckService) -> None:
    log.critical("batch stuck past its time budget and could not be interrupted; ending this process")
    try:
        service.time_out(batch, lease)
    finally:
        logging.shutdown()
        os._exit(WATCHDOG_EXIT_STATUS)
