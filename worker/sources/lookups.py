"""DNS lookups for the fetcher on a few kept threads: getaddrinfo takes no timeout, so each lookup runs on a thread
of its own while its caller waits only as long as its budget lasts.

A lookup left behind keeps its thread until the resolver gives up on it. With every thread held so (the resolver
stopped answering), a new lookup fails at once, a transient `url.connection`, instead of queueing or starting
threads: a resolver outage costs a fixed number of threads and each fetch an error, however many fetches are tried.
Host names are chosen by senders, and a domain's own name servers can be made to never answer: so one domain (its
last two labels) holds at most `per_domain` of the threads, and a domain whose lookups hang fails at once too,
leaving the other threads to every other domain.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import Any

from worker.sources.addresses import FetchError

LOOKUP_THREADS = 8  # lookups at once in a process; a lookup that answers takes milliseconds
PER_DOMAIN = 2  # of those, lookups under one domain


def domain_of(host: str) -> str:
    """The group a host's lookups count in: its last two labels (example.com for img.cdn.example.com), a coarse
    stand-in for the registered domain whose name servers answer for it."""
    return ".".join(host.lower().rstrip(".").split(".")[-2:])


class _Lookup:
    def __init__(self, work: Callable[[], Any], domain: str):
        self.work, self.domain = work, domain
        self.outcome: Any = None
        self.finished = self.abandoned = False
        self.done = threading.Event()


class Lookups:
    """At most `threads` lookups at once, `per_domain` of them under one domain, on daemon threads started as
    needed and kept."""

    def __init__(self, threads: int = LOOKUP_THREADS, per_domain: int = PER_DOMAIN):
        self.threads, self.per_domain = threads, per_domain
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # a lookup finished: a caller may submit
        self._work = threading.Condition(self._lock)  # a lookup was submitted: a thread may take it
        self._waiting: collections.deque[_Lookup] = collections.deque()
        self.started = 0  # threads
        self.busy = 0  # lookups submitted and not finished
        self.abandoned = 0  # of those, lookups whose caller stopped waiting
        self._domains: collections.Counter[str] = collections.Counter()  # busy, per domain
        self._domains_abandoned: collections.Counter[str] = collections.Counter()

    def run(self, host: str, work: Callable[[], Any], deadline: float, late: Callable[[], Exception]) -> Any:
        """What `work()` returns (or raises) if it ends by `deadline` (time.monotonic()); raises `late()` if not, or
        url.connection at once when the threads it may use all wait on a name server that does not answer."""
        lookup = _Lookup(work, domain_of(host))
        with self._lock:
            self._wait_for_room(host, lookup.domain, deadline, late)
            self.busy += 1
            self._domains[lookup.domain] += 1
            self._waiting.append(lookup)
            if self.started < self.threads:
                self.started += 1
                threading.Thread(target=self._serve, name="item-resolve", daemon=True).start()
            self._work.notify()
        if not lookup.done.wait(max(0.0, deadline - time.monotonic())):
            with self._lock:
                if not lookup.finished:
                    lookup.abandoned = True
                    self.abandoned += 1
                    self._domains_abandoned[lookup.domain] += 1
                    raise late()
        if isinstance(lookup.outcome, Exception):
            raise lookup.outcome
        return lookup.outcome

    def _wait_for_room(self, host: str, domain: str, deadline: float, late: Callable[[], Exception]) -> None:
        while self.busy >= self.threads or self._domains[domain] >= self.per_domain:
            hung = self.abandoned >= self.threads or self._domains_abandoned[domain] >= self.per_domain
            if hung:
                who = "the resolver" if self.abandoned >= self.threads else f"the name servers of {domain}"
                raise FetchError(
                    f"Looking up {host} failed: {who} is not answering (earlier lookups are still waiting).",
                    code="url.connection",
                    permanent=False,
                )
            left = deadline - time.monotonic()
            if left <= 0:
                raise late()
            self._room.wait(left)

    def _serve(self) -> None:
        lookup = None
        try:
            while True:
                with self._lock:
                    while not self._waiting:
                        self._work.wait()
                    lookup = self._waiting.popleft()
                try:
                    lookup.outcome = lookup.work()
                except Exception as error:  # raised again on the caller's thread
                    lookup.outcome = error
                self._finish(lookup)
                lookup = None
        finally:  # only something that is no Exception ends a thread: its lookup still ends, and a thread may start
            with self._lock:
                self.started -= 1
            if lookup is not None:
                self._finish(lookup)

    def _finish(self, lookup: _Lookup) -> None:
        with self._lock:
            lookup.finished = True
            self.busy -= 1
            self.abandoned -= lookup.abandoned
            for counter, by in ((self._domains, 1), (self._domains_abandoned, int(lookup.abandoned))):
                counter[lookup.domain] -= by
                if counter[lookup.domain] <= 0:
                    del counter[lookup.domain]
            self._room.notify_all()  # waiters of any domain: the one that may go now re-checks
        lookup.done.set()


LOOKUPS = Lookups()
