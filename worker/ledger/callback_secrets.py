"""Callback secrets: each tenant's secrets that sign its callbacks, and their rotation.

A tenant has one current secret (`retires_at` NULL). A rotation adds a new current one and gives the previous one
`retires_at = now + window`: until then both sign every callback (the signature header names each by key id), so
the platform's receiver can switch to the new secret at leisure. Retiring sets `retires_at` to now; purging deletes
what retired. The secrets are kept in clear, since the service signs with them: whoever reads the ledger can sign.

The default tenant may also sign with ITEM_CALLBACK_SECRET, the unnamed secret of before tenants (see
`worker.outbox.delivery`); the rows here are the only secrets of every other tenant.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session

from pipeline.core.errors import ItemError
from worker.ledger.models import CallbackSecretRow, TenantRow, utcnow
from worker.ledger.tenants import require_tenant

KEY_ID_PREFIX = "cs"
MAX_WINDOW_S = 90 * 86_400  # a rotation left open longer is a second permanent secret, not a rotation


class CallbackSecretError(ItemError):
    """A callback secret asked for that does not exist, or an operation its state does not allow. Permanent."""

    code = "callback_secret.invalid"


class CallbackSecretExists(CallbackSecretError):
    code = "callback_secret.exists"


class NoCallbackSecret(CallbackSecretError):
    code = "callback_secret.none"


class UnknownCallbackSecret(CallbackSecretError):
    code = "callback_secret.unknown"


class CurrentCallbackSecret(CallbackSecretError):
    code = "callback_secret.current"


@dataclass(frozen=True)
class MadeSecret:
    """A secret just made: the only time its value leaves the ledger for a person to copy."""

    key_id: str
    tenant_id: str
    secret: str
    retiring: tuple[str, ...] = ()  # key ids that now retire (a rotation's previous current secret)
    retires_at: datetime | None = None  # when they stop signing


def new_key_id() -> str:
    return KEY_ID_PREFIX + secrets.token_hex(6)


def create_secret(session: Session, tenant_id: str) -> MadeSecret:
    """A tenant's first secret (or its first again, after every one retired); one that has a current secret is
    refused: `rotate_secret` replaces it without a gap."""
    _lock_tenant(session, tenant_id)
    current = _current(session, tenant_id)
    if current:
        raise CallbackSecretExists(
            f"Tenant {tenant_id!r} has a current callback secret ({current[0].key_id}); "
            f"`item secrets rotate --tenant {tenant_id}` replaces it."
        )
    return _add(session, tenant_id)


def rotate_secret(session: Session, tenant_id: str, window_s: float) -> MadeSecret:
    """Adds a new current secret; the current one(s) sign beside it for `window_s` more seconds (0: stop now).
    Secrets that retired before now are deleted on the way."""
    if not 0 <= window_s <= MAX_WINDOW_S:
        raise CallbackSecretError(f"A rotation window is 0 to {MAX_WINDOW_S // 86_400} days, not {window_s:g} s.")
    _lock_tenant(session, tenant_id)
    current = _current(session, tenant_id)
    if not current:
        raise NoCallbackSecret(
            f"Tenant {tenant_id!r} has no current callback secret to rotate; "
            f"`item secrets create --tenant {tenant_id}` makes its first."
        )
    now = utcnow()
    purge_retired(session, tenant_id=tenant_id, now=now)  # before: the secret retiring now stays listed
    retires_at = now + timedelta(seconds=window_s)
    retiring = tuple(row.key_id for row in current)
    session.execute(
        sa.update(CallbackSecretRow).where(CallbackSecretRow.key_id.in_(retiring)).values(retires_at=retires_at)
    )
    made = _add(session, tenant_id)
    return MadeSecret(made.key_id, tenant_id, made.secret, retiring, retires_at)


def retire_secret(session: Session, tenant_id: str, key_id: str) -> CallbackSecretRow:
    """Stops a retiring secret from signing now (a leaked one, or the receiver switched early). The current
    secret is refused: `rotate_secret` with a window of 0 replaces it at once, so callbacks never go unsigned."""
    _lock_tenant(session, tenant_id)
    row = session.get(CallbackSecretRow, key_id, populate_existing=True) if isinstance(key_id, str) else None
    if row is None or row.tenant_id != tenant_id:
        raise UnknownCallbackSecret(
            f"Tenant {tenant_id!r} has no callback secret {str(key_id)[:40]!r}; `item secrets list` shows them."
        )
    if row.retires_at is None:
        raise CurrentCallbackSecret(
            f"{key_id} is tenant {tenant_id!r}'s current callback secret; `item secrets rotate --tenant {tenant_id} "
            "--window 0` replaces it at once (retiring it would leave the tenant's callbacks unsigned, never sent)."
        )
    now = utcnow()
    if row.retires_at > now:
        row.retires_at = now
    session.flush()
    return row


def list_secrets(session: Session, tenant_id: str | None = None) -> list[CallbackSecretRow]:
    """Secrets by tenant, current first, then the newest: rows, whose `secret` a caller must never show."""
    query = sa.select(CallbackSecretRow).order_by(
        CallbackSecretRow.tenant_id, CallbackSecretRow.retires_at.is_not(None), CallbackSecretRow.created_at.desc()
    )
    if tenant_id is not None:
        query = query.where(CallbackSecretRow.tenant_id == tenant_id)
    return list(session.scalars(query.execution_options(populate_existing=True)))


def signing_secrets(session: Session, now: datetime | None = None) -> list[CallbackSecretRow]:
    """Every tenant's secrets that sign at `now` or later: the current ones and those still in their window."""
    now = now or utcnow()
    valid = sa.or_(CallbackSecretRow.retires_at.is_(None), CallbackSecretRow.retires_at > now)
    query = sa.select(CallbackSecretRow).where(valid).order_by(CallbackSecretRow.created_at.desc())
    return list(session.scalars(query.execution_options(populate_existing=True)))


def purge_retired(session: Session, *, tenant_id: str | None = None, now: datetime | None = None) -> int:
    """Deletes secrets whose window ended before `now` (of one tenant, or all); returns how many."""
    condition = CallbackSecretRow.retires_at <= (now or utcnow())
    if tenant_id is not None:
        condition = sa.and_(condition, CallbackSecretRow.tenant_id == tenant_id)
    return session.execute(sa.delete(CallbackSecretRow).where(condition)).rowcount


def state(row: CallbackSecretRow, now: datetime | None = None) -> str:
    """ "current", "retiring" (signs until `retires_at`) or "retired" (signs no more)."""
    if row.retires_at is None:
        return "current"
    return "retiring" if row.retires_at > (now or utcnow()) else "retired"


def _add(session: Session, tenant_id: str) -> MadeSecret:
    row = CallbackSecretRow(
        key_id=new_key_id(), tenant_id=tenant_id, secret=secrets.token_urlsafe(32), created_at=utcnow()
    )
    session.add(row)
    session.flush()
    return MadeSecret(row.key_id, tenant_id, row.secret)


def _current(session: Session, tenant_id: str) -> list[CallbackSecretRow]:
    query = sa.select(CallbackSecretRow).where(
        CallbackSecretRow.tenant_id == tenant_id, CallbackSecretRow.retires_at.is_(None)
    )
    return list(session.scalars(query.execution_options(populate_existing=True)))


def _lock_tenant(session: Session, tenant_id: str) -> None:
    """Raises UnknownTenant for no such tenant; on PostgreSQL, holds its row until the commit, so two rotations
    of one tenant at once run one after the other (and never leave two current secrets)."""
    locked = sa.select(TenantRow.id).where(TenantRow.id == tenant_id).with_for_update()
    if not isinstance(tenant_id, str) or session.execute(locked).first() is None:
        require_tenant(session, tenant_id)  # raises, saying so


__all__ = [
    "CallbackSecretError",
    "CallbackSecretExists",
    "CurrentCallbackSecret",
    "MadeSecret",
    "NoCallbackSecret",
    "UnknownCallbackSecret",
    "create_secret",
    "list_secrets",
    "purge_retired",
    "retire_secret",
    "rotate_secret",
    "signing_secrets",
    "state",
]
