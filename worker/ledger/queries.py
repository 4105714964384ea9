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


def insert_many(session: Session, model: type, rows: list[dict]) -> None:
    """INSERT ... ON CONFLICT DO NOTHING of many rows as one executemany: SQLAlchemy sends them as multi-row
    VALUES pages of up to 1,000 (one statement for a batch) from one compiled, cached statement, where
    `.values(rows)` would compile a new statement for every batch size. The RETURNING is what makes SQLAlchemy
    page the rows (without it psycopg would send one INSERT per row)."""
    if rows:
        table = model.__table__
        statement = dialect_insert(session, table).on_conflict_do_nothing().returning(*table.primary_key.columns)
        session.connection().execute(statement, rows).all()


def claim_rows(
    session: Session,
    model: type,
    *,
    claimable: sa.ColumnElement[bool],
    order_by: Sequence[sa.ColumnElement],
    limit: int,
    values: dict,
    any_of: Sequence[sa.ColumnElement[bool]] = (),
) -> list:
    """Takes up to `limit` rows of `model` meeting `claimable` (and one of `any_of`, when given), in `order_by`
    order, setting `values` on them.

    One statement: an UPDATE of the ids a sub-select picked, which re-checks the condition so a row that changed
    meanwhile is left alone. On PostgreSQL the pick locks its rows and skips ones another transaction is
    claiming (SKIP LOCKED), never waiting for them, so two claimers never take the same row. The pick is a
    materialised CTE: as a plain IN (subquery), Postgres may re-run the subquery while updating and take far
    more than `limit` rows (seen: 12 for a limit of 4).

    `any_of` are alternatives no row meets two of (it would count twice against the limit), each with an index of
    its own in `order_by` order. On PostgreSQL each is picked apart (its `limit` first rows, locked as above) and
    the union of those picks cut to the `limit` first: the same rows as one ordered pick of their OR, which Postgres
    would answer by reading both indexes' matches and sorting them all. Until the transaction ends, rows a pick
    locked but the cut left out are skipped by other claimers too. `order_by` must then be plain columns,
    ascending. SQLite gets the OR in one pick, as it always has.
    """
    return claim_shares(
        session, model, claimable=claimable, shares=[(sa.true(), limit)], order_by=order_by, values=values,
        any_of=any_of,
    )  # fmt: skip


def claim_shares(
    session: Session,
    model: type,
    *,
    claimable: sa.ColumnElement[bool],
    shares: Sequence[tuple[sa.ColumnElement[bool], int]],
    order_by: Sequence[sa.ColumnElement],
    values: dict,
    any_of: Sequence[sa.ColumnElement[bool]] = (),
) -> list:
    """`claim_rows` of several disjoint parts at once: up to `limit` rows of each (`condition`, `limit`) of
    `shares`, each part picked in `order_by` order from its own index range (locked and skipping rows others are
    claiming, on PostgreSQL), all set to `values` in one UPDATE. The fair claim across tenants (`claims.claim`):
    a part is one tenant, so a tenant's share is read from its own range of the claim index however long another
    tenant's backlog is."""
    condition = sa.and_(claimable, sa.or_(*any_of)) if any_of else claimable
    postgres = session.get_bind().dialect.name == "postgresql"
    picks = []
    for index, (part, limit) in enumerate(shares):
        name = f"share_{index}"
        if postgres and len(any_of) > 1:
            alternatives = [sa.and_(claimable, part, one) for one in any_of]
            picks.append(_pick_each(model, alternatives, order_by, limit, name=name))
        else:
            picks.append(_pick(model, sa.and_(condition, part), order_by, limit, name=name, lock=postgres))
    picked = sa.union_all(*(sa.select(pick.c.id) for pick in picks)).subquery("picked")
    statement = (
        sa.update(model)
        .where(model.id.in_(sa.select(picked.c.id)), condition)
        .values(**values)
        .returning(model)
        .execution_options(populate_existing=True)
    )
    return list(session.scalars(statement).all())


def _pick(
    model: type,
    condition: sa.ColumnElement[bool],
    order_by: Sequence[sa.ColumnElement],
    limit: int,
    *,
    name: str,
    lock: bool,
    keys: Sequence[sa.ColumnElement] = (),
) -> sa.CTE:
    """The ids (and `keys`) of the `limit` first rows meeting `condition`: a materialised CTE, see `claim_rows`."""
    candidates = sa.select(model.id, *keys).where(condition).order_by(*order_by).limit(limit)
    if lock:
        candidates = candidates.with_for_update(skip_locked=True)
    return candidates.cte(name).prefix_with("MATERIALIZED", dialect="postgresql")


def _pick_each(
    model: type,
    conditions: Sequence[sa.ColumnElement[bool]],
    order_by: Sequence[sa.ColumnElement],
    limit: int,
    *,
    name: str = "picked",
) -> sa.CTE:
    """One locked pick per condition, then the `limit` first of all of them, by the same order (PostgreSQL)."""
    keys = [column.label(f"key_{index}") for index, column in enumerate(order_by)]
    picks = [
        _pick(model, condition, order_by, limit, name=f"{name}_{index}", lock=True, keys=keys)
        for index, condition in enumerate(conditions)
    ]
    union = sa.union_all(*(sa.select(pick) for pick in picks)).subquery(f"{name}_all")
    first = sa.select(union.c.id).order_by(*(union.c[key.name] for key in keys)).limit(limit)
    return first.cte(name).prefix_with("MATERIALIZED", dialect="postgresql")
