"""The watchdog of a GPU loop: it bounds a batch's time in the models without interrupting them.

Nothing is raised into model code: an exception landing inside `generate` or a CUDA graph capture can leave the
model or the device broken. A model call cannot be stopped, only abandoned; so once the batch the models run is
past its deadline, the watchdog records each of its checks still held as `check.timeout` (retried, or failed once
attempts run out), and in a worker ends the process with WATCHDOG_EXIT_STATUS for the GPU step to replace it.

In the embedded mode (`item submit` without a broker, a library call) ending the process would end the person's
command: there the call runs to its end, the timeout is recorded at the deadline all the same, and the loop drops
what the models made of the batch.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from worker.gpu import exits
from worker.gpu.batches import Batch, CheckService
from worker.ledger.engine import INFRASTRUCTURE_ERRORS
from worker.ops.supervise import Supervised

log = logging.getLogger("item.worker")

WATCHDOG_EXIT_STATUS = exits.WATCHDOG
LAST_WORDS_S = 30.0  # how long a process ending itself may take to record why before it ends regardless


class Watchdog:
    """Watches the batch the models run now: in a worker (`end_process`) from one supervised thread for the
    process's life; in the embedded mode from a timer per batch, so nothing outlives a person's command."""

    def __init__(self, service: CheckService, *, end_process: bool):
        self.service, self.end_process = service, end_process
        self._changed = threading.Condition()
        self._batch: Batch | None = None
        self._stopping = threading.Event()
        self._thread = None
        if end_process:
            self._thread = Supervised("watchdog", self._watch, stopping=self._stopping, on_death="exit").start()

    def run(self, batch: Batch, models: Callable[[], None]) -> bool:
        """`models()` under watch; False if `batch` was timed out meanwhile (its checks are recorded)."""
        with self._changed:
            self._batch = batch
            self._changed.notify()
        timer = None
        if self._thread is None:
            timer = threading.Timer(max(0.0, batch.left_s()), self._expire_if_watched, (batch,))
            timer.daemon = True
            timer.start()
        try:
            models()
        finally:
            if timer is not None:
                timer.cancel()
            with self._changed:  # waits for a timeout being recorded now: the store never races it
                self._batch = None
        return not batch.timed_out

    def stop(self) -> None:
        self._stopping.set()
        with self._changed:
            self._changed.notify()
        if self._thread is not None:
            self._thread.stop(5)

    def _watch(self) -> None:
        with self._changed:
            while not self._stopping.is_set():
                batch = self._batch
                if batch is None:
                    self._changed.wait()
                elif batch.left_s() > 0:
                    self._changed.wait(batch.left_s())
                else:
                    self._batch = None
                    self._expire(batch)

    def _expire_if_watched(self, batch: Batch) -> None:
        with self._changed:
            if self._batch is batch:
                self._batch = None
                self._expire(batch)

    def _expire(self, batch: Batch) -> None:
        batch.timed_out = True
        budget = self.service.settings.batch_time_budget_s
        if self.end_process:
            log.critical("batch of %d checks still in the models past its time budget (%.0fs); its unfinished "
                         "checks are retried (check.timeout) and this process ends (status %d) to be replaced",
                         len(batch.checks), budget, WATCHDOG_EXIT_STATUS)  # fmt: skip
            end_process(WATCHDOG_EXIT_STATUS, lambda: self.service.time_out(batch.checks, batch.lease))
        log.error("batch of %d checks still in the models past its time budget (%.0fs); its unfinished checks are "
                  "retried (check.timeout), and what the models make of them is dropped",
                  len(batch.checks), budget)  # fmt: skip
        try:
            self.service.time_out(batch.checks, batch.lease)
        except INFRASTRUCTURE_ERRORS:
            log.warning("could not record the timeout of %d checks; they are redone after their lease",
                        len(batch.checks))  # fmt: skip


def end_process(status: int, last_words: Callable[[], None]) -> None:
    """Records what it can, then ends the process with `status`. A ledger that hangs cannot keep a broken process
    alive: past LAST_WORDS_S it ends regardless."""
    backstop = threading.Timer(LAST_WORDS_S, os._exit, (status,))
    backstop.daemon = True
    backstop.start()
    try:
        last_words()
    except Exception:
        log.warning("could not record the end of the batch; its checks are redone after their lease", exc_info=True)
    finally:
        logging.shutdown()
        os._exit(status)
