"""Calls into code that cannot be interrupted (a native parser), with a time limit that holds even if one never
returns.

Each call runs on a fresh daemon thread. Past its limit the caller stops waiting and the thread is abandoned: left
to end, or not, on its own. A call that hangs therefore costs only its own caller, never the calls after it (a
fixed pool would be starved by as many hangs as it has threads), nor the process's exit (a daemon thread is not
joined). Abandoned threads are counted; while `max_abandoned` of them are still running no call starts, so hangs
cannot pile up threads either: at most `concurrency + max_abandoned - 1` are ever alive.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("item.timed_calls")


class CallTimeout(Exception):
    """The call did not end, or could not start, within its time limit."""


class TooManyStuck(Exception):
    """`max_abandoned` calls are still running past their limit: no thread is spent on another for now."""


class _Call:
    """One call on a thread of its own; its waiter may stop waiting and leave it behind."""

    def __init__(self, function, args: tuple):
        self.function, self.args = function, args
        self.done = threading.Event()
        self.result = self.error = None
        self.ended_at = float("inf")  # time.monotonic() when the function returned or raised
        self._lock = threading.Lock()
        self._on_late_end = None

    def run(self) -> None:
        try:
            self.result = self.function(*self.args)
        except BaseException as error:  # handed to the waiter, who says what it was
            self.error = error
        self.ended_at = time.monotonic()
        with self._lock:
            self.done.set()
            on_late_end = self._on_late_end
        if on_late_end is not None:
            on_late_end()

    def abandon(self, on_late_end) -> bool:
        """Leaves the call running; `on_late_end` is called if it ever ends. False: it has just ended."""
        with self._lock:
            if self.done.is_set():
                return False
            self._on_late_end = on_late_end
            return True

    def outcome(self):
        if self.error is not None:
            raise self.error
        return self.result


class TimedCalls:
    """Runs calls at most `concurrency` at once, each on its own thread named `name`, within a time limit."""

    def __init__(self, name: str, concurrency: int, max_abandoned: int):
        self.name, self.max_abandoned = name, max_abandoned
        self._slots = threading.Semaphore(concurrency)
        self._lock = threading.Lock()
        self.abandoned = 0  # calls left running past their limit that have not ended yet

    def run(self, function, args: tuple, timeout_s: float):
        """`function(*args)`, or CallTimeout past `timeout_s` (waiting for a free slot included), or TooManyStuck."""
        deadline = time.monotonic() + timeout_s
        if not self._slots.acquire(timeout=timeout_s):
            raise CallTimeout
        try:
            call = self._start(function, args)
            if call.done.wait(max(0.0, deadline - time.monotonic())) or not call.abandon(self._late_end):
                if call.ended_at > deadline:  # it ended after its limit, before its waiter looked: still too late
                    raise CallTimeout
                return call.outcome()
            self._left_behind()
            raise CallTimeout
        finally:
            self._slots.release()  # an abandoned call's slot too: the next call gets a fresh thread

    def _start(self, function, args: tuple) -> _Call:
        with self._lock:
            if self.abandoned >= self.max_abandoned:
                raise TooManyStuck(f"{self.abandoned} calls are still running past their time limit")
        call = _Call(function, args)
        threading.Thread(target=call.run, name=self.name, daemon=True).start()
        return call

    def _left_behind(self) -> None:
        with self._lock:
            self.abandoned += 1
            count = self.abandoned
        log.warning("%s: a call ran past its time limit and is left behind (%d of %d)", self.name, count,
                    self.max_abandoned)  # fmt: skip

    def _late_end(self) -> None:
        with self._lock:
            self.abandoned -= 1
