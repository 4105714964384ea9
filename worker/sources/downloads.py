"""Downloads that outlive the batch that started them, so that no slow source holds a batch.

A batch waits for its checks' downloads (URLs, S3 objects) only a short while (ITEM_BATCH_READ_WAIT_S, see
`worker.gpu.batches`); a check whose bytes are not there by then leaves the batch (it is deferred: queued again,
its attempt not counted) while its download goes on here, within its own time limit (ITEM_FETCH_TIMEOUT_S). What
the download got, bytes or error, is kept for the check's next claim in this process, which takes it instead of
fetching again; a check claimed by another process simply fetches there.

Bounded everywhere, whatever senders send: at most `concurrency` downloads at once in a process, each on a
thread of its own; at most `per_host` of them from one host, so a stalling host holds only its own slots; at
most `max_entries` entries and `max_bytes` of finished bodies kept, each for at most `keep_s`. A check that leaves
again and again comes back later each time (doubling from `first_delay_s`, and never after its download's own
time limit has surely ended it); one that found no free slot `max_deferrals` times ends as a transient url.timeout
through the ordinary retry path.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from pipeline.core.errors import ItemError
from worker.sources.kinds import BusyHost

log = logging.getLogger("item.worker")

REMOTE_KINDS = ("url", "s3")  # what may be slow to read; inline bytes (blobs) and local paths never leave a batch
KEEP_S = 60.0  # how long a finished download waits for its check to come back
MAX_DEFERRALS = 8  # times a check may leave for want of a free download slot before it ends as url.timeout


class Deferred(ItemError):
    """A check's bytes are not there yet: it leaves its batch and comes back after `delay_s`. Never a check's
    error: `reason` is `downloading` (its download runs on) or `waiting` (no download slot was free)."""

    code = "source.deferred"
    permanent = False

    def __init__(self, message: str, *, delay_s: float, reason: str):
        super().__init__(message, code=self.code)
        self.delay_s = delay_s
        self.reason = reason


@dataclass
class _Entry:
    source: dict
    host: str
    touched: float  # when it was made or last asked for (time.monotonic())
    state: str = "waiting"  # waiting (for a slot), running, done
    data: bytes | None = None
    error: ItemError | None = None
    started: float = 0.0
    ended: float = 0.0
    deferrals: int = 0


def host_of(source: dict) -> str:
    """The host a remote source is read from, as the per-host limit counts it."""
    if source.get("s3") is not None:
        return f"s3:{source['s3'].get('bucket', '')}" if isinstance(source["s3"], dict) else "s3:"
    try:
        return (urlsplit(str(source.get("url", ""))).hostname or "").lower()
    except ValueError:  # a malformed URL: its download refuses it at once
        return ""


class Downloads:
    """The background downloads of one process, and what they got, by check id."""

    def __init__(
        self,
        load: Callable[[dict], bytes],
        *,
        concurrency: int,
        per_host: int,
        timeout_s: float,
        first_delay_s: float,
        max_bytes: int,
        keep_s: float = KEEP_S,
        max_entries: int | None = None,
        max_deferrals: int = MAX_DEFERRALS,
    ):
        self._load = load  # a source's bytes within `timeout_s`, or an ItemError
        self.concurrency, self.per_host, self.timeout_s = concurrency, per_host, timeout_s
        self.first_delay_s, self.keep_s, self.max_deferrals = first_delay_s, keep_s, max_deferrals
        self.max_entries = max_entries or 4 * concurrency
        self.max_bytes = max_bytes
        self._cond = threading.Condition()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()  # oldest first
        self._hosts: Counter[str] = Counter()  # downloads running, per host
        self.running = 0
        self._bytes = 0  # of finished bodies kept

    def handles(self, source: dict) -> bool:
        """Whether `source` is read here: a URL or an S3 object, unless a batch waits as long as a download may
        take (a read wait of ITEM_FETCH_TIMEOUT_S or more: every download is then read within its batch)."""
        return self.first_delay_s < self.timeout_s and any(source.get(kind) is not None for kind in REMOTE_KINDS)

    def __len__(self) -> int:
        return len(self._entries)

    def read(self, key: str, source: dict, until: float) -> bytes:
        """The bytes of check `key`'s `source`: what a download this process made for it got, or what one started
        now gets by `until` (time.monotonic()). Raises the download's error, or `Deferred` when its bytes are not
        there by then; a download already running when asked is not waited for: its check leaves at once."""
        with self._cond:
            now = time.monotonic()
            self._prune(now)
            entry = self._entries.get(key)
            if entry is not None and entry.source != source:  # not the download of this source
                self._drop(key, entry)
                entry = None
            if entry is None:
                entry = self._entries[key] = _Entry(source, host_of(source), now)
                wait_until = until
            else:
                entry.touched, wait_until = now, now
            self._entries.move_to_end(key)
            while entry.state != "done":
                if entry.state == "waiting" and self._start(key, entry):
                    wait_until = until  # started now: it gets the batch's wait
                left = wait_until - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if entry.state != "done":
                deferred = self._deferral(key, entry, time.monotonic())
            else:
                deferred = None
                self._drop(key, entry)
            self._evict()
        if deferred is not None:
            raise deferred
        if entry.error is not None:
            raise entry.error
        return entry.data

    def _deferral(self, key: str, entry: _Entry, now: float) -> ItemError:
        """Why and for how long `entry`'s check leaves its batch; past `max_deferrals` without a slot, its end."""
        entry.deferrals += 1
        delay = self.first_delay_s * 2 ** (entry.deferrals - 1)
        if entry.state == "running":
            # Back when the download has surely ended, at the latest: its own time limit ends it.
            ends = entry.started + self.timeout_s - now
            return Deferred(
                f"Its download from {entry.host or 'its host'} is still running.",
                delay_s=min(delay, max(self.first_delay_s, ends + 0.5)),
                reason="downloading",
            )
        if entry.deferrals > self.max_deferrals:
            self._drop(key, entry)
            return BusyHost(
                f"No download slot for {entry.host or 'its host'} came free in {entry.deferrals - 1} tries "
                f"(ITEM_FETCH_CONCURRENCY {self.concurrency}, ITEM_FETCH_PER_HOST {self.per_host})."
            )
        return Deferred(
            f"No download slot for {entry.host or 'its host'} is free.",
            delay_s=min(delay, self.timeout_s),
            reason="waiting",
        )

    def _start(self, key: str, entry: _Entry) -> bool:
        if self.running >= self.concurrency or self._hosts[entry.host] >= self.per_host:
            return False
        entry.state, entry.started = "running", time.monotonic()
        self.running += 1
        self._hosts[entry.host] += 1
        threading.Thread(target=self._download, args=(key, entry), name="item-download", daemon=True).start()
        return True

    def _download(self, key: str, entry: _Entry) -> None:
        data, error = None, None
        try:
            data = self._load(entry.source)
        except ItemError as failure:
            error = failure
        except Exception as failure:  # a bug: the check is retried (and failed once attempts run out)
            log.exception("a background download crashed")
            error = ItemError(f"Internal error: {failure!r}", code="check.internal_error")
            error.permanent = False
        with self._cond:
            entry.state, entry.data, entry.error, entry.ended = "done", data, error, time.monotonic()
            self.running -= 1
            self._hosts[entry.host] -= 1
            if not self._hosts[entry.host]:
                del self._hosts[entry.host]
            if self._entries.get(key) is entry:  # kept: its check may come back for it
                self._bytes += len(data or b"")
            self._evict()
            self._cond.notify_all()

    def _drop(self, key: str, entry: _Entry) -> None:
        if self._entries.get(key) is not entry:
            return
        del self._entries[key]
        if entry.state == "done":
            self._bytes -= len(entry.data or b"")

    def _prune(self, now: float) -> None:
        """Forgets what waited too long for its check: finished downloads, and checks that never came back."""
        stale = [
            (key, entry)
            for key, entry in self._entries.items()
            if entry.state != "running" and max(entry.touched, entry.ended) < now - self.keep_s
        ]
        for key, entry in stale:
            self._drop(key, entry)

    def _evict(self) -> None:
        """Drops the oldest entries not running while there are too many, or too many bytes kept."""
        for key, entry in [(key, entry) for key, entry in self._entries.items() if entry.state != "running"]:
            if len(self._entries) <= self.max_entries and self._bytes <= self.max_bytes:
                return
            self._drop(key, entry)
