"""The GPU loop: one per worker process, claiming batches of its pipeline version from the ledger.

    claim up to batch_size ready checks under a new lease  ─▶  run them (service.run_batch) within the batch's
    time budget, a heartbeat renewing the lease meanwhile  ─▶  nothing to claim: wait for a wake-up or a poll

A worker that dies leaves its checks `running` under a lease nobody renews; once it expires any worker of the
version claims them again. A batch past its budget is interrupted wherever it is, the models included, and each
of its unfinished checks is retried as `check.timeout`; if the interruption cannot land (the thread is stuck
inside native code), a watchdog records the timeouts and ends the process, which its supervisor replaces.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from worker.ledger.store import Lease
from worker.ledger.wakeups import Listener
from worker.logs import OutageLog
from worker.service import INFRASTRUCTURE_ERRORS, BatchTimeout, CheckService

log = logging.getLogger("item.worker")

WATCHDOG_GRACE_S = 30  # after the budget, how long the interruption may take before the process is ended
WATCHDOG_EXIT_STATUS = 70  # EX_SOFTWARE: the supervisor replaces the process


def owner_name() -> str:
    """Who holds a lease, for people reading the ledger: host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"[:128]


class Heartbeat:
    """Renews the lease of the batch in flight every third of its length, on a thread of its own."""

    def __init__(self, service: CheckService, every_s: float):
        self.service = service
        self.every_s = every_s

    @contextmanager
    def holding(self, lease: Lease, checks: int) -> Iterator[None]:
        done = threading.Event()
        thread = threading.Thread(target=self._renew, args=(lease, checks, done), name="item-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(5)

    def _renew(self, lease: Lease, checks: int, done: threading.Event) -> None:
        while not done.wait(self.every_s):
            try:
                with self.service.ledger.session() as session:
                    held = self.service.ledger.renew(session, lease)
            except Exception:  # the ledger is down: the lease may run out, and the checks are redone elsewhere
                log.warning("could not renew lease %s", lease.token, exc_info=True)
                continue
            if held < checks:
                log.warning("lease %s holds %d of its %d checks: the rest ended or were taken over", lease.token,
                            held, checks)  # fmt: skip
                checks = held


class Loop:
    """Claims and runs batches until `stop` is set."""

    def __init__(self, service: CheckService, *, listener: Listener | None = None, stop: threading.Event | None = None):
        self.service = service
        self.settings = service.settings
        self.listener = listener or Listener(self.settings.database_url, service.version_id)
        self.stop = stop or threading.Event()
        self.owner = owner_name()
        self.heartbeat = Heartbeat(service, self.settings.lease_s / 3)

    def run_forever(self) -> None:
        outage = OutageLog(
            log, "the ledger is unreachable; claimed checks wait out their lease and are redone",
            "the ledger is still unreachable",
        )  # fmt: skip
        while not self.stop.is_set():
            try:
                ran = self.run_once()
                outage.recovered()
            except INFRASTRUCTURE_ERRORS:
                outage.failed()
                self.stop.wait(min(5.0, self.settings.idle_poll_s))
                continue
            if not ran:
                self.listener.wait(self.settings.idle_poll_s)
        self.listener.close()

    def run_once(self) -> int:
        """Claims one batch and runs it; returns how many checks it held (0: nothing was ready)."""
        lease = Lease.new(self.owner, self.settings.lease_s)
        batch = self.service.claim_batch(lease)
        if not batch:
            return 0
        budget = _budget(self.settings.batch_time_budget_s, batch, lease, self.service)
        try:
            with self.heartbeat.holding(lease, len(batch)), budget:
                self.service.run_batch(batch, lease)
        except BatchTimeout:  # the checks it finished are left as they are: only those still held are retried
            log.error("batch of %d checks ran past its time budget; its unfinished checks are retried", len(batch))
            self.service.time_out(batch, lease)
        return len(batch)

    def run_until(self, finished: Callable[[], bool], *, idle_s: float = 0.2) -> None:
        """Runs batches until `finished()` (the embedded mode: a person waits for their checks)."""
        while not finished():
            if not self.run_once():
                time.sleep(idle_s)


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
