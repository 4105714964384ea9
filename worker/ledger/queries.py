"""Query shapes every part of the ledger shares: claiming rows, IN lists, fresh reads, idempotent inserts.

Checks and deliveries are both claimed the same way (see `claim_rows`), and both are read and written by
several processes at once, so these are written once, here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, TypeVar

import sqlalchemy as sa
from sqlalchemy.orm import Session

if TYPE_CHECKING:
    from sqlalchemy.dialects import postgresql, sqlite

IN_CHUNK = 500  # values per IN (...) list: far under every backend's limit on bound parameters

T = TypeVar("T")


def in_chunks(values: Sequence[T], size: int = IN_CHUNK) -> Iterator[list[T]]:
    """`values` in slices of at most `size`, for one `IN (...)` query each."""
    values = list(values)
    for start in range(0, len(values), size):
        yield values[start : start + size]


def fresh(query: sa.Select) -> sa.Select:
    """Reads overwrite rows already in the session: another process may have changed them since."""
    return query.execution_options(populate_existing=True)


def dialect_insert(session: Session, model: type) -> postgresql.Insert | sqlite.Insert:
    """The dialect's INSERT, which has ON CONFLICT DO NOTHING (the generic one does not)."""
    dialect = session.get_bind().dialect.name  # imported here: a ledger uses one of them, never both
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert

        return insert(model)
    if dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert

        return insert(model)
    raise NotImplementedError(f"the ledger runs on PostgreSQL or SQLite, not {dialect}")


def claim_rows(
    session: Session,
    model: type,
    *,
    claimable: sa.ColumnElement[bool],
    order_by: Sequence[sa.ColumnElement],
    limit: int,
    values: dict,
) -> list:
    """Takes up to `limit` rows of `model` meeting `claimable`, in `order_by` order, setting `values` on them.

    One statement: an UPDATE of the ids a sub-select picked, which re-checks `claimable` so a row that changed
    meanwhile is left alone. On PostgreSQL the pick locks its rows and skips ones another transaction is
    claiming (SKIP LOCKED), never waiting for them, so two claimers never take the same row. The pick is a
    materialised CTE: as a plain IN (subquery), Postgres may re-run the subquery while updating and take far
    more than `limit` rows (seen: 12 for a limit of 4).
    """
    candidates = sa.select(model.id).where(claimable).order_by(*order_by).limit(limit)
    if session.get_bind().dialect.name == "postgresql":
        candidates = candidates.with_for_update(skip_locked=True)
    picked = candidates.cte("picked").prefix_with("MATERIALIZED", dialect="postgresql")
    statement = (
        sa.update(model)
        .where(model.id.in_(sa.select(picked.c.id)), claimable)
        .values(**values)
        .returning(model)
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(statement).all())
