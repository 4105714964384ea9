"""Tenants: the platforms sharing one deployment. Each check, key, decision and delivery is one tenant's; reads are
narrowed to it (an operator key, made explicitly for all tenants, reads across them), and its weight, rate and
backlog cap are set here.

A deployment that never names a tenant has one, `default` (made by the migration that introduced tenants), so
everything works as it did before tenants existed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session

from pipeline.core.errors import ItemError
from worker.ledger.models import DEFAULT_TENANT, TenantRow, utcnow
from worker.ledger.queries import dialect_insert

# A slug: it names the tenant's broker queue (item.checks.<tenant>), Redis ACL user and key prefix, and a metric
# label, so it keeps to characters every one of them takes unquoted.
TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_WEIGHT = 1_000


class TenantError(ItemError):
    """A tenant asked for that does not exist, or settings it cannot have. Permanent."""

    code = "tenant.invalid"


class UnknownTenant(TenantError):
    code = "tenant.unknown"


@dataclass(frozen=True)
class TenantLimits:
    """What may be changed about a tenant (None: leave as is)."""

    name: str | None = None
    weight: int | None = None
    rate_per_s: float | None = None
    burst: int | None = None
    backlog_cap: int | None = None


def checked_id(tenant_id: str) -> str:
    if not isinstance(tenant_id, str) or not TENANT_ID.fullmatch(tenant_id):
        raise TenantError(
            f"Tenant id {str(tenant_id)[:80]!r} is not valid: 1 to 63 of a-z, 0-9, '_' and '-', starting with a "
            "letter or digit (it names the tenant's broker queue and user)."
        )
    return tenant_id


def _checked_limits(limits: TenantLimits) -> dict:
    values = {key: value for key, value in vars(limits).items() if value is not None}
    if "name" in values and not 0 < len(values["name"].strip()) <= 128:
        raise TenantError("A tenant's name is 1 to 128 characters.")
    if "weight" in values and not 1 <= values["weight"] <= MAX_WEIGHT:
        raise TenantError(f"A tenant's weight is 1 to {MAX_WEIGHT} (its share of every claim, against the others').")
    if "rate_per_s" in values and not 0 < values["rate_per_s"] <= 1e6:
        raise TenantError("A tenant's rate is above 0 and at most 1,000,000 checks a second (omit it for no limit).")
    if "burst" in values and not 1 <= values["burst"] <= 10_000_000:
        raise TenantError("A tenant's burst is 1 to 10,000,000 checks.")
    if "backlog_cap" in values and not 1 <= values["backlog_cap"] <= 1_000_000_000:
        raise TenantError("A tenant's backlog cap is 1 to 1,000,000,000 queued checks.")
    return values


def create_tenant(session: Session, tenant_id: str, limits: TenantLimits = TenantLimits()) -> TenantRow:
    """Adds a tenant; one that exists already is a TenantError (names are never reused silently)."""
    values = {"name": tenant_id, **_checked_limits(limits)}
    statement = dialect_insert(session, TenantRow).values(id=checked_id(tenant_id), created_at=utcnow(), **values)
    if session.execute(statement.on_conflict_do_nothing().returning(TenantRow.id)).first() is None:
        raise TenantError(f"Tenant {tenant_id!r} exists already; `item tenants set` changes it.")
    return get_tenant(session, tenant_id)


def update_tenant(session: Session, tenant_id: str, limits: TenantLimits, *, clear: tuple[str, ...] = ()) -> TenantRow:
    """Changes a tenant's settings; `clear` names limits to remove (rate_per_s, burst, backlog_cap)."""
    values = _checked_limits(limits) | {field: None for field in clear}
    row = require_tenant(session, tenant_id)
    if values:
        session.execute(sa.update(TenantRow).where(TenantRow.id == row.id).values(**values))
    return get_tenant(session, tenant_id)


def set_disabled(session: Session, tenant_id: str, disabled: bool) -> TenantRow:
    """A disabled tenant files no new checks (`tenant.disabled`); its checks, keys and reads go on."""
    row = require_tenant(session, tenant_id)
    disabled_at = utcnow() if disabled else None
    session.execute(sa.update(TenantRow).where(TenantRow.id == row.id).values(disabled_at=disabled_at))
    return get_tenant(session, tenant_id)


def pin_version(session: Session, tenant_id: str, version_id: str | None) -> TenantRow:
    """Files the tenant's new checks under `version_id` from now on (None: the deployment's active version)."""
    row = require_tenant(session, tenant_id)
    session.execute(sa.update(TenantRow).where(TenantRow.id == row.id).values(pipeline_version_id=version_id))
    return get_tenant(session, tenant_id)


def get_tenant(session: Session, tenant_id: str) -> TenantRow | None:
    return session.scalars(
        sa.select(TenantRow).where(TenantRow.id == tenant_id).execution_options(populate_existing=True)
    ).one_or_none()


def require_tenant(session: Session, tenant_id: str) -> TenantRow:
    row = get_tenant(session, tenant_id) if isinstance(tenant_id, str) else None
    if row is None:
        raise UnknownTenant(f"No tenant {str(tenant_id)[:80]!r}; `item tenants list` shows them.")
    return row


def list_tenants(session: Session) -> list[TenantRow]:
    return list(session.scalars(sa.select(TenantRow).order_by(TenantRow.id)))


def tenant_ids(session: Session) -> list[str]:
    return list(session.scalars(sa.select(TenantRow.id).order_by(TenantRow.id)))


__all__ = [
    "DEFAULT_TENANT",
    "TENANT_ID",
    "TenantError",
    "TenantLimits",
    "UnknownTenant",
    "checked_id",
    "create_tenant",
    "get_tenant",
    "list_tenants",
    "pin_version",
    "require_tenant",
    "set_disabled",
    "tenant_ids",
    "update_tenant",
]
