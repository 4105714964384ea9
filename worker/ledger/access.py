"""Keys of the HTTP API and console, and console sessions: rows keyed by hashes, never by secrets."""

from __future__ import annotations

from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger.models import ApiKeyRow, ConsoleSessionRow, utcnow


def add_key(
    session: Session, key_id: str, name: str, scopes: list[str], secret_sha256: str, tenant_id: str | None
) -> ApiKeyRow:
    """`tenant_id` None makes an operator key: it reads every tenant's checks (see `worker.web.keys.Principal`)."""
    row = ApiKeyRow(
        id=key_id, name=name, scopes=scopes, secret_sha256=secret_sha256, tenant_id=tenant_id, created_at=utcnow()
    )
    session.add(row)
    session.flush()
    return row


def get_key(session: Session, key_id: str) -> ApiKeyRow | None:
    return session.get(ApiKeyRow, key_id)


def list_keys(session: Session, *, include_revoked: bool = False) -> list[ApiKeyRow]:
    query = sa.select(ApiKeyRow).order_by(ApiKeyRow.created_at, ApiKeyRow.id)
    if not include_revoked:
        query = query.where(ApiKeyRow.revoked_at.is_(None))
    return list(session.scalars(query))


def revoke_key(session: Session, key_id_or_name: str) -> list[ApiKeyRow]:
    """Revokes the live key of that id, or every live key of that name; ends their console sessions."""
    live = sa.select(ApiKeyRow).where(ApiKeyRow.revoked_at.is_(None))
    rows = list(session.scalars(live.where(sa.or_(ApiKeyRow.id == key_id_or_name, ApiKeyRow.name == key_id_or_name))))
    now = utcnow()
    for row in rows:
        row.revoked_at = now
    if rows:
        ids = [row.id for row in rows]
        session.execute(sa.delete(ConsoleSessionRow).where(ConsoleSessionRow.key_id.in_(ids)))
    return rows


def touch_key(session: Session, key_id: str, when: datetime) -> None:
    session.execute(sa.update(ApiKeyRow).where(ApiKeyRow.id == key_id).values(last_used_at=when))


def add_session(session: Session, token_sha256: str, key_id: str, csrf_token: str, lasts: timedelta) -> None:
    now = utcnow()
    session.add(
        ConsoleSessionRow(
            token_sha256=token_sha256, key_id=key_id, csrf_token=csrf_token, created_at=now, expires_at=now + lasts
        )
    )


def live_session(session: Session, token_sha256: str) -> tuple[ConsoleSessionRow, ApiKeyRow] | None:
    """The unexpired session of that token hash with its key, if the key is not revoked."""
    query = (
        sa.select(ConsoleSessionRow, ApiKeyRow)
        .join(ApiKeyRow, ApiKeyRow.id == ConsoleSessionRow.key_id)
        .where(
            ConsoleSessionRow.token_sha256 == token_sha256,
            ConsoleSessionRow.expires_at > utcnow(),
            ApiKeyRow.revoked_at.is_(None),
        )
    )
    row = session.execute(query).first()
    return (row[0], row[1]) if row else None


def end_session(session: Session, token_sha256: str) -> None:
    session.execute(sa.delete(ConsoleSessionRow).where(ConsoleSessionRow.token_sha256 == token_sha256))


def purge_sessions(session: Session) -> int:
    result = session.execute(sa.delete(ConsoleSessionRow).where(ConsoleSessionRow.expires_at <= utcnow()))
    return result.rowcount or 0
