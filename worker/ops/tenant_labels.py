"""The `tenant` label, bounded: at most ITEM_METRICS_TENANTS values, whatever the number of tenants.

Processes count with the tenant's own id (a slug, never free text); what a scrape exposes is folded here: the
`default` tenant and the heaviest others (by weight, then id: the same choice on every host, from the ledger) keep
their id, and every other tenant's samples are summed under `tenant="other"`. The choice is read again at most
every REFRESH_S; while the ledger cannot be read, the last one stands (at first: `default` alone).
"""

from __future__ import annotations

import logging
import threading
import time

import sqlalchemy as sa

from worker.settings import Settings

log = logging.getLogger("item.metrics")

OTHER = "other"
DEFAULT_TENANT = "default"
REFRESH_S = 30.0


def chosen_tenants(session, limit: int) -> frozenset[str]:
    """`default` and the `limit - 1` heaviest other tenants (weight, then id): one small indexed read."""
    from worker.ledger.models import TenantRow

    others = session.scalars(
        sa.select(TenantRow.id)
        .where(TenantRow.id != DEFAULT_TENANT)
        .order_by(TenantRow.weight.desc(), TenantRow.id)
        .limit(max(0, limit - 1))
    )
    return frozenset({DEFAULT_TENANT, *others})


class TenantLabels:
    """One exposition's choice of tenant label values, read from the ledger when older than REFRESH_S."""

    def __init__(self, settings: Settings, ledger=None):
        self.settings, self._ledger = settings, ledger
        self._chosen: frozenset[str] = frozenset({DEFAULT_TENANT})
        self._read_at = -float("inf")
        self._lock = threading.Lock()

    def chosen(self) -> frozenset[str]:
        with self._lock:
            if time.monotonic() - self._read_at >= REFRESH_S:
                self._read_at = time.monotonic()
                self._chosen = self._read() or self._chosen
            return self._chosen

    def fold(self, families):
        """The families as collected, each with a `tenant` label folded to the chosen values (samples of the
        tenants folded together summed, per the other labels)."""
        chosen = None
        for family in families:
            if not any("tenant" in sample.labels for sample in family.samples):
                yield family
                continue
            chosen = chosen if chosen is not None else self.chosen()
            yield _folded(family, chosen)

    def _read(self) -> frozenset[str] | None:
        try:
            if self._ledger is None:
                from worker.ledger.store import Ledger

                self._ledger = Ledger(self.settings.database_url)
            with self._ledger.session() as session:
                return chosen_tenants(session, self.settings.metrics_tenants)
        except Exception as error:  # a scrape answers without the ledger: the last choice stands
            log.warning("tenant labels not read (the last choice stands): %s", error)
            return None


def _folded(family, chosen: frozenset[str]):
    folded: dict[tuple, float] = {}
    for sample in family.samples:
        labels = dict(sample.labels)
        if labels.get("tenant", DEFAULT_TENANT) not in chosen:
            labels["tenant"] = OTHER
        key = (sample.name, tuple(sorted(labels.items())), sample.timestamp)
        if key not in folded:
            folded[key] = sample.value
        elif sample.name.endswith("_created"):  # when the earliest of them was created, not a sum of times
            folded[key] = min(folded[key], sample.value)
        else:
            folded[key] += sample.value
    like = family.samples[0]
    family.samples = [
        like._replace(name=name, labels=dict(labels), value=value, timestamp=timestamp, exemplar=None)
        for (name, labels, timestamp), value in folded.items()
    ]
    return family


def count_waiting(session, chosen: frozenset[str], cap: int) -> dict[tuple[str, str], int]:
    """{(priority, tenant label): checks ready for a worker} (`item_checks_waiting`): each chosen tenant's read
    from its own range of the claim index, every other tenant's together (only if there are others), each count
    stopping at `cap / labels` (at least 1,000), so a scrape reads about as many index entries as one count of
    all of them did."""
    from worker.ledger import listing
    from worker.ledger.models import TenantRow

    each = max(1_000, cap // (len(chosen) + 1))
    counts: dict[tuple[str, str], int] = {}
    for tenant_id in sorted(chosen):
        for priority, n in listing.count_waiting(session, each, tenant_id=tenant_id).items():
            counts[(priority, tenant_id)] = n
    if session.execute(sa.select(TenantRow.id).where(TenantRow.id.not_in(chosen)).limit(1)).first() is None:
        return counts
    for priority, n in listing.count_waiting(session, each, not_of=sorted(chosen)).items():
        counts[(priority, OTHER)] = n
    return counts


__all__ = ["OTHER", "TenantLabels", "chosen_tenants", "count_waiting"]
