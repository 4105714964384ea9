"""Wake-ups are coalesced: a burst of filings sends a few NOTIFYs, never one per transaction, and the last filing
is always followed by one sent after it committed."""

from __future__ import annotations

import time

import psycopg

from worker.ledger import wakeups
from worker.ledger.engine import libpq_dsn
from worker.ledger.store import Ledger


def test_a_burst_of_filings_sends_a_few_notifications_the_last_after_the_last_commit(postgres_url):
    ledger = Ledger(postgres_url)
    listener = psycopg.connect(libpq_dsn(ledger.engine.url), autocommit=True)
    try:
        listener.execute(f"LISTEN {wakeups.CHANNEL}")
        started = time.monotonic()
        for _ in range(40):
            with ledger.session() as session:
                wakeups.notify_new_checks(session, "pv-burst")
        last_commit = time.monotonic()
        burst_s = last_commit - started
        heard = []
        for note in listener.notifies(timeout=1.0):
            heard.append((time.monotonic(), note.payload))
    finally:
        listener.close()
        ledger.dispose()
    assert heard and all(payload == "pv-burst" for _, payload in heard)
    assert len(heard) <= 2 + burst_s / wakeups.COALESCE_S  # one per window, not one per transaction (40)
    assert heard[-1][0] >= last_commit  # the trailing one: nothing filed is left without a wake-up
