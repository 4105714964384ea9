"""Supervised threads: every long-lived thread of a worker is alive and counted, or visibly dead and replaced.

    Supervised("deliverer", deliverer.run_passes).start()
      └─ a daemon thread named item-deliverer; if `run_passes` raises, the death is logged with its traceback
         and counted (item_thread_deaths_total{thread="deliverer"}), the part reads as dead, and then either
         ─ restart: the target runs again after a doubling delay (reset once it has lived a while), or
         ─ exit:    the process ends with EXIT_STATUS, for its own supervisor (the GPU step, compose,
                    Kubernetes) to replace: for a thread whose state the process cannot rebuild on its own.

A part that is dead makes the worker not ready: `dead_parts()` is what the worker's /readyz and its
`item_worker_ready` read. Besides supervised threads, other parts (the GPU processes, the consumer) register a
probe with `watch`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

log = logging.getLogger("item.worker")

EXIT_STATUS = 70  # EX_SOFTWARE: the process is replaced (see worker/gpu/exits.py), its leases run out
RESTART_BACKOFF_S = (1.0, 60.0)  # first and longest wait before a dead thread runs again
STABLE_AFTER_S = 60.0  # a thread that lived this long before dying is restarted after the first wait again


def name_os_thread(name: str) -> None:
    """Gives the calling thread `name` in the operating system too (Linux: its first 15 bytes), so `top -H`, `ps -L`
    and /proc show which thread of a worker uses the CPU; threads it starts inherit the name. Best effort."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, name.encode()[:15])  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


BACKGROUND_NICENESS = 5  # how much lower a GPU process's helper threads are scheduled than its model thread


def lower_thread_priority(niceness: int = BACKGROUND_NICENESS) -> None:
    """Schedules the calling thread (and the threads it starts) `niceness` below its process: a GPU process's
    prefetch and store threads, so that when the device finishes, the model thread gets a core at once rather
    than after their time slice (README, "Keeping a GPU busy"). Raising niceness needs no privilege. Linux only;
    best effort elsewhere."""
    with contextlib.suppress(OSError, AttributeError):
        thread = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + niceness)


_probes: dict[str, Callable[[], bool]] = {}
_probes_lock = threading.Lock()


def watch(part: str, alive: Callable[[], bool]) -> None:
    """Counts `part` among what must be alive for this process to be ready (`alive` must be cheap, never raise)."""
    with _probes_lock:
        _probes[part] = alive


def unwatch(part: str) -> None:
    with _probes_lock:
        _probes.pop(part, None)


def dead_parts() -> list[str]:
    """The watched parts of this process that are not alive now, by name."""
    with _probes_lock:
        probes = list(_probes.items())
    dead = []
    for part, alive in probes:
        try:
            ok = alive()
        except Exception:  # a probe that fails says the part cannot be vouched for
            ok = False
        if not ok:
            dead.append(part)
    return sorted(dead)


class Supervised:
    """Runs `target` on a daemon thread named `item-<part>`, for as long as the process lives or until `stop()`.

    `target` is the thread's whole life: it returns once `stopping` is set, or raises. Returning before that
    counts as a death too: a long-lived thread that quietly ends is as dead as one that crashed.
    """

    def __init__(
        self,
        part: str,
        target: Callable[[], None],
        *,
        stopping: threading.Event | None = None,
        wake: Callable[[], None] | None = None,
        on_death: str = "restart",
    ):
        if on_death not in ("restart", "exit"):
            raise ValueError(f"on_death is restart or exit, not {on_death!r}")
        self.part, self.target, self.on_death = part, target, on_death
        self.deaths = 0
        self._stopping = stopping or threading.Event()  # the target's own stop event, when it watches one
        self._wake = wake  # tells a target that watches no event to return (a server's shutdown)
        self._running = threading.Event()  # the target runs now (between a death and its restart: not)
        self._thread = threading.Thread(target=self._live, name=f"item-{part}", daemon=True)

    def start(self) -> Supervised:
        watch(self.part, self.is_alive)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Sets `stopping` (the target returns at its next look), then waits for the thread."""
        self._stopping.set()
        unwatch(self.part)
        if self._wake is not None and self._running.is_set():
            self._wake()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive() and self._running.is_set()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def _live(self) -> None:
        name_os_thread(self._thread.name)
        wait = RESTART_BACKOFF_S[0]
        while not self._stopping.is_set():
            started = time.monotonic()
            self._running.set()
            try:
                self.target()
            except BaseException:  # noqa: BLE001  (SystemExit or a stray async exception ends a thread too)
                self._running.clear()
                self._died(sys.exc_info())
            else:
                self._running.clear()
                if self._stopping.is_set():
                    return
                self._died(None)
            if time.monotonic() - started >= STABLE_AFTER_S:
                wait = RESTART_BACKOFF_S[0]
            if self._stopping.wait(wait):
                return
            log.warning("restarting thread %s (death %d)", self._thread.name, self.deaths)
            wait = min(RESTART_BACKOFF_S[1], wait * 2)

    def _died(self, exc_info) -> None:
        from worker.ops import metrics

        self.deaths += 1
        metrics.THREAD_DEATHS.labels(self.part).inc()
        what = "crashed" if exc_info else "returned before it was told to stop"
        if self.on_death == "exit":
            log.critical("thread %s %s; ending this process (status %d) to be replaced",
                         self._thread.name, what, EXIT_STATUS, exc_info=exc_info)  # fmt: skip
            logging.shutdown()
            os._exit(EXIT_STATUS)  # noqa: SLF001  (its state cannot be rebuilt here; the process is replaced)
        log.error("thread %s %s; it is restarted", self._thread.name, what, exc_info=exc_info)
