"""The moderators' review queue: done checks a human should look at, taken one at a time under a lease.

The queue fills as checks end: `enqueue` is called by `transitions.finish_done_many` in the transaction that ends
them, one statement per batch. A fresh upload that ended `uncertain` (band 0) or `fake` (band 1) gets an item; a
re-score does not (its upload was queued when it was first checked, and an upgrade would otherwise queue the whole
ledger again). A share of items, chosen by a hash of the check id (so the choice is the same on every worker), needs
two reviews by two different moderators: their agreement is what the operations page reports.

A moderator takes the first open item of a tenant in queue order (the uncertain band first, then the highest
p(fake), then the oldest) under a lease (`take_next`), as a worker claims checks (`queries.claim_rows`: one UPDATE,
SKIP LOCKED on PostgreSQL), so two moderators never review one item at once. Deciding names the lease token and
succeeds only for its holder (`decide`); a lease that expired may be taken over, and the old holder's decision is
then refused (`LeaseLost`). A moderator who asks again while holding a live lease gets the same item back (a page
reload loses no work and takes nothing more). Skipping gives the item to the others at once and keeps it from the
one who skipped for SKIP_S. Decisions made outside the queue (the check page, the API) count too (`count_decision`).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from pipeline.core.errors import ItemError
from worker.ledger.models import CheckRow, DecisionRow, ReviewItemRow, TenantRow, new_id, utcnow
from worker.ledger.queries import claim_rows, fresh, insert_many
from worker.ledger.states import CheckStatus, Priority

LABELS = ("ai_generated", "authentic", "unsure")  # what a moderator decides (`reviews.LABELS` too)
BANDS = {"uncertain": 0, "fake": 1}  # the queue's first key: what most needs a human first
DOUBLE_SHARE = 0.05  # ITEM_REVIEW_DOUBLE_SHARE
LEASE_S = 300.0  # ITEM_REVIEW_LEASE_S
SKIP_S = 600.0  # a skipped item is not offered to the moderator who skipped it for this long
COUNT_CAP = 10_000  # the backlog count on the operations page stops here
DELETE_BATCH = 5_000

Item = ReviewItemRow


class ReviewError(ItemError):
    """A review that cannot be recorded as asked. Permanent."""

    code = "review.invalid"


class LeaseLost(ReviewError):
    """The moderator's hold on the item ended: it expired and another moderator took the item, or it was decided."""

    code = "review.lease_lost"


# ---------------------------------------------------------------------- filling the queue


def needs_two(check_id: str, share: float) -> bool:
    """Whether a check's item is one of the `share` reviewed twice: a hash, so every worker decides the same."""
    draw = int.from_bytes(hashlib.sha256(check_id.encode()).digest()[:8], "big") / 2**64
    return draw < share


def enqueue(session: Session, checks: Iterable[CheckRow], double_share: float = DOUBLE_SHARE) -> int:
    """Queues the fresh uploads among `checks` that ended done as uncertain or fake: one statement for the batch,
    an item already queued (a result stored again) left as it is. A verdict the bank made (`match`: a near-copy of
    an image a moderator decided) is not queued: it was reviewed already. Returns how many were offered."""
    now = utcnow()
    rows = [
        {
            "check_id": check.id,
            "check_created_at": check.created_at,
            "tenant_id": check.tenant_id,
            "band": BANDS[check.verdict],
            "p_fake_desc": -(check.p_fake if check.p_fake is not None else 1.0),  # a declared fake: certain
            "created_at": now,
            "reviews_needed": 2 if needs_two(check.id, double_share) else 1,
            "reviews_done": 0,
        }
        for check in checks
        if check.status == CheckStatus.done
        and check.verdict in BANDS
        and check.priority == Priority.fresh
        and check.verdict_reason != "match"
    ]
    insert_many(session, ReviewItemRow, rows)
    return len(rows)


# ---------------------------------------------------------------------- taking, deciding, skipping


def take_next(session: Session, moderator: str, tenant_id: str | None, lease_s: float = LEASE_S) -> Item | None:
    """The item `moderator` (a key id) should review now, held for `lease_s`: the one it holds already (its lease
    renewed), else the first free open item of `tenant_id` in queue order that it has not reviewed nor skipped
    lately. `tenant_id` None takes from every tenant in one merged order (an operator key): one pick per tenant,
    each from its own range of the queue index. None when there is nothing to review."""
    now = utcnow()
    tenants = [tenant_id] if tenant_id is not None else list(session.scalars(sa.select(TenantRow.id)))
    if not tenants:
        return None
    held = _held(session, moderator, tenants, now)
    lease = {"lease_owner": moderator, "lease_token": new_id(), "lease_expires_at": now + timedelta(seconds=lease_s)}
    if held is not None:
        renewed = sa.update(Item).where(Item.check_id == held.check_id, Item.lease_token == held.lease_token)
        renewed = renewed.values(lease_expires_at=lease["lease_expires_at"]).returning(Item)
        return session.scalars(renewed.execution_options(populate_existing=True)).first()
    taken = claim_rows(
        session,
        Item,
        claimable=_takeable(moderator, now),
        any_of=[Item.tenant_id == one for one in tenants],
        order_by=[Item.band, Item.p_fake_desc, Item.created_at],
        limit=1,
        values=lease,
    )
    return taken[0] if taken else None


def decide(
    session: Session,
    check_id: str,
    lease_token: str,
    label: str,
    moderator: str,
    reviewer: str,
    note: str | None = None,
) -> DecisionRow:
    """Records `moderator`'s decision on the item it holds under `lease_token`, and counts the review; the item's
    lease ends. Refused (`LeaseLost`) once another moderator took the item over or it was decided otherwise."""
    if label not in LABELS:
        raise ReviewError(f"A decision is one of {', '.join(LABELS)}, not {label[:40]!r}.")
    statement = (
        sa.update(Item)
        .where(Item.check_id == check_id, Item.lease_token == lease_token, Item.lease_owner == moderator)
        .values(
            reviews_done=Item.reviews_done + 1, reviewed_by=sa.func.coalesce(Item.reviewed_by, moderator), **_no_lease()
        )  # fmt: skip
        .returning(Item.tenant_id)
    )
    tenant_id = session.execute(statement).scalar_one_or_none()
    if tenant_id is None:
        raise LeaseLost(
            "Your hold on this item ended: it expired and another moderator took it (or it was decided on its "
            "check page). Your decision was not recorded; the next item is yours."
        )
    row = DecisionRow(check_id=check_id, tenant_id=tenant_id, label=label, reviewer=reviewer, key_id=moderator,
                      note=note, decided_at=utcnow())  # fmt: skip
    session.add(row)
    session.flush()
    feed_bank(session, row)
    return row


BANK_LABELS = {"ai_generated": "fake", "authentic": "real"}  # a decision's label as the bank keeps it; unsure: none


def feed_bank(session: Session, decision: DecisionRow) -> None:
    """A moderator's decision in its tenant's bank of near-copies (`worker.gpu.near_copies`), by its image's PDQ
    hash: `ai_generated` flags the image's near-copies, `authentic` keeps them from being flagged by score alone, and
    `unsure` takes the check's entry out (the latest decision on a check is the one that counts). An image kept
    without a hash (a video, or stored before hashes were) is not banked."""
    from pipeline.core.pdq import MIN_QUALITY  # numpy and Pillow: not for the client side, which imports this module
    from worker.ledger import checks, images, near

    label = BANK_LABELS.get(decision.label)
    if label is None:
        near.bank_remove(session, decision.tenant_id, decision.check_id)
        return
    decided = checks.checks_by_id(session, [decision.check_id])
    sha = decided[0].image_sha256 if decided else None
    _, pdq, quality = images.image_facts(session, [sha]).get(sha, (None, None, None)) if sha else (None, None, None)
    if pdq is not None and quality is not None and quality >= MIN_QUALITY:  # a flat picture's hash matches any flat one
        decided_by = decision.key_id or decision.reviewer
        near.bank_put(session, decision.tenant_id, label, decision.check_id, sha, pdq, decision.id, decided_by)


def skip(session: Session, check_id: str, lease_token: str, moderator: str, skip_s: float = SKIP_S) -> bool:
    """Gives the item back at once to the other moderators; `moderator` is not offered it again for `skip_s`.
    False when the lease was no longer the moderator's (nothing to give back)."""
    statement = (
        sa.update(Item)
        .where(Item.check_id == check_id, Item.lease_token == lease_token, Item.lease_owner == moderator)
        .values(lease_token=None, lease_expires_at=utcnow() + timedelta(seconds=skip_s))
    )
    return bool(session.execute(statement).rowcount)


def count_decision(session: Session, check_id: str, key_id: str | None) -> bool:
    """A decision made outside the queue (the check page, the API) counts as a review of the check's open item,
    unless another moderator holds it under a live lease (their decision will count) or this key reviewed it
    already. Returns whether it counted."""
    now = utcnow()
    conditions = [Item.check_id == check_id, _open()]
    conditions.append(sa.or_(Item.lease_token.is_(None), Item.lease_expires_at < now, Item.lease_owner == key_id))
    if key_id is not None:
        conditions.append(sa.or_(Item.reviewed_by.is_(None), Item.reviewed_by != key_id))
    statement = (
        sa.update(Item)
        .where(*conditions)
        .values(
            reviews_done=Item.reviews_done + 1, reviewed_by=sa.func.coalesce(Item.reviewed_by, key_id), **_no_lease()
        )  # fmt: skip
    )
    return bool(session.execute(statement).rowcount)


def get_item(session: Session, check_id: str) -> Item | None:
    return session.scalars(fresh(sa.select(Item).where(Item.check_id == check_id))).one_or_none()


def forget(session: Session, check_id: str) -> None:
    """Drops an item whose check is gone (past the checks' retention): there is nothing left to review."""
    session.execute(sa.delete(Item).where(Item.check_id == check_id))


def _held(session: Session, moderator: str, tenants: list[str], now: datetime) -> Item | None:
    """The open item `moderator` holds under a live lease, if any (read through the small `lease_owner` index)."""
    query = (
        sa.select(Item)
        .where(Item.lease_owner == moderator, Item.lease_token.is_not(None), Item.lease_expires_at > now, _open())
        .where(Item.tenant_id.in_(tenants))
        .order_by(Item.band, Item.p_fake_desc, Item.created_at)
        .limit(1)
    )
    return session.scalars(fresh(query)).first()


def _open() -> sa.ColumnElement[bool]:
    """The WHERE of the queue index, written as it is, so PostgreSQL reads that index."""
    return Item.reviews_done < Item.reviews_needed


def _takeable(moderator: str, now: datetime) -> sa.ColumnElement[bool]:
    free = sa.or_(Item.lease_token.is_(None), Item.lease_expires_at < now)  # never held, given back, or expired
    not_mine_before = sa.or_(Item.reviewed_by.is_(None), Item.reviewed_by != moderator)  # a second review: another
    # Not skipped by this moderator lately (owner = moderator, no token, expiry ahead: see `skip`), written as an
    # OR of the negations so a NULL column leaves the row takeable (NOT of a NULL comparison would not).
    not_skipped = sa.or_(
        Item.lease_owner.is_(None), Item.lease_owner != moderator, Item.lease_token.is_not(None),
        Item.lease_expires_at.is_(None), Item.lease_expires_at <= now,
    )  # fmt: skip
    return sa.and_(_open(), free, not_mine_before, not_skipped)


def _no_lease() -> dict:
    return {"lease_owner": None, "lease_token": None, "lease_expires_at": None}


# ---------------------------------------------------------------------- the operations page


@dataclass(frozen=True)
class ModeratorCount:
    reviewer: str
    key_id: str | None
    last_hour: int
    last_day: int


@dataclass(frozen=True)
class Agreement:
    """Checks two different moderators decided in the window: how many, how many alike, and Cohen's kappa (the
    agreement beyond what their label frequencies would give by chance; None when undefined)."""

    items: int
    agreeing: int
    kappa: float | None

    @property
    def share(self) -> float | None:
        return self.agreeing / self.items if self.items else None


AGREEMENT_WINDOW = timedelta(days=7)


def review_figures(session: Session, tenant_id: str | None, now: datetime) -> dict:
    """The operations page's review figures, of one tenant or all: items waiting per band, decisions per moderator
    (last hour and day), and agreement on the checks two moderators decided in the last AGREEMENT_WINDOW."""
    return {
        "waiting": open_counts(session, tenant_id),
        "moderators": moderator_counts(session, tenant_id, now),
        "agreement": agreement(session, tenant_id, now - AGREEMENT_WINDOW),
        "agreement_days": AGREEMENT_WINDOW.days,
    }


def moderator_counts(session: Session, tenant_id: str | None, now: datetime, limit: int = 50) -> list[ModeratorCount]:
    """Decisions per moderator in the last hour and day (of one tenant, or all with None), busiest first; a day of
    decisions read through the (tenant_id, decided_at) index, at most `limit` moderators."""
    hour, day = now - timedelta(hours=1), now - timedelta(days=1)
    in_hour = sa.func.sum(sa.case((DecisionRow.decided_at >= hour, 1), else_=0))
    in_day = sa.func.count()
    query = sa.select(DecisionRow.reviewer, DecisionRow.key_id, in_hour, in_day).where(DecisionRow.decided_at >= day)
    if tenant_id is not None:
        query = query.where(DecisionRow.tenant_id == tenant_id)
    query = query.group_by(DecisionRow.reviewer, DecisionRow.key_id).order_by(in_day.desc(), DecisionRow.reviewer)
    return [ModeratorCount(reviewer, key_id, int(h or 0), int(d)) for reviewer, key_id, h, d in session.execute(
        query.limit(limit))]  # fmt: skip


def agreement(session: Session, tenant_id: str | None, since: datetime, limit: int = 1_000) -> Agreement:
    """Agreement on the checks (at most `limit`) that two different moderators decided since `since`: each one's
    first decision, the two earliest moderators of each check."""
    who = sa.func.coalesce(DecisionRow.key_id, DecisionRow.reviewer)
    window = [DecisionRow.decided_at >= since]
    if tenant_id is not None:
        window.append(DecisionRow.tenant_id == tenant_id)
    doubled = (
        sa.select(DecisionRow.check_id).where(*window).group_by(DecisionRow.check_id)
        .having(sa.func.count(sa.distinct(who)) >= 2).limit(limit)
    )  # fmt: skip
    query = (
        sa.select(DecisionRow.check_id, who, DecisionRow.label)
        .where(*window, DecisionRow.check_id.in_(doubled))
        .order_by(DecisionRow.check_id, DecisionRow.decided_at, DecisionRow.id)
    )
    firsts: dict[str, dict[str, str]] = {}  # check: {moderator: first label}, in decision order
    for check_id, moderator, label in session.execute(query):
        firsts.setdefault(check_id, {}).setdefault(moderator, label)
    pairs = [tuple(labels.values())[:2] for labels in firsts.values() if len(labels) >= 2]
    return Agreement(len(pairs), sum(a == b for a, b in pairs), cohens_kappa(pairs))


def cohens_kappa(pairs: list[tuple[str, str]]) -> float | None:
    """(observed − chance agreement) / (1 − chance), chance from each rater's label frequencies."""
    if not pairs:
        return None
    n = len(pairs)
    first, second = Counter(a for a, _ in pairs), Counter(b for _, b in pairs)
    observed = sum(a == b for a, b in pairs) / n
    chance = sum(first[label] * second[label] for label in first) / (n * n)
    return None if chance >= 1 else (observed - chance) / (1 - chance)


def open_counts(session: Session, tenant_id: str | None, cap: int = COUNT_CAP) -> dict[str, int]:
    """Items waiting for a review per band (each up to `cap`), of one tenant or all."""
    counts = {}
    for name, band in BANDS.items():
        query = sa.select(Item.check_id).where(_open(), Item.band == band)
        if tenant_id is not None:
            query = query.where(Item.tenant_id == tenant_id)
        counts[name] = session.execute(sa.select(sa.func.count()).select_from(query.limit(cap).subquery())).scalar_one()
    return counts


# ---------------------------------------------------------------------- retention


def purge(session: Session, older_than: timedelta, limit: int = DELETE_BATCH) -> int:
    """Deletes up to `limit` items that have every review they need, or entered the queue `older_than` ago (an
    upload nobody reviewed in time stays findable on its check page). Returns how many; the caller repeats."""
    deleted = 0
    # Two deletes, each read from an index of its own (`ix_review_items_reviewed`, `ix_review_items_created_at`):
    # one of their OR would read the whole table.
    for ended in (Item.reviews_done >= Item.reviews_needed, Item.created_at < utcnow() - older_than):
        batch = sa.select(Item.check_id).where(ended).limit(limit - deleted)
        deleted += session.execute(sa.delete(Item).where(Item.check_id.in_(batch))).rowcount or 0
        if deleted >= limit:
            break
    return deleted
