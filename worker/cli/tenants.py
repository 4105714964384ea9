"""`item tenants create | list | set | disable | enable | pin`: the platforms sharing this deployment.

A tenant's checks, keys, decisions and deliveries are its own: its keys read nothing else. Its weight is its share
of every claim against the others'; its rate (and burst) and backlog cap limit what it may file. A deployment that
never makes one has `default`, which holds everything made before tenants existed.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from worker.cli.common import JsonOpt, err, fail, in_ledger, out

app = typer.Typer()
tenants_app = typer.Typer(help="Tenants (platforms) of this deployment: create, list, limit, disable, pin.",
                          no_args_is_help=True)  # fmt: skip
app.add_typer(tenants_app, name="tenants")

NameOpt = Annotated[str | None, typer.Option("--name", help="A readable name (default: the id).")]
WeightOpt = Annotated[int | None, typer.Option("--weight", help="Share of every claim against the others' (1-1000).")]
RateOpt = Annotated[float | None, typer.Option("--rate", help="Checks filed per second at most (default: no limit).")]
BurstOpt = Annotated[int | None, typer.Option("--burst", help="Checks filed at once above the rate.")]
BacklogOpt = Annotated[int | None, typer.Option("--backlog-cap", help="Checks queued at once at most.")]


def _changed(session_work) -> dict:
    """Runs `session_work(session)` in one transaction of a migrated ledger; the tenant it returns, as a dict."""
    return in_ledger(lambda session: tenant_dict(session_work(session)))


def tenant_dict(row) -> dict:
    limits = {name: getattr(row, name) for name in ("weight", "rate_per_s", "burst", "backlog_cap")}
    times = {name: getattr(row, name) and getattr(row, name).isoformat() for name in ("created_at", "disabled_at")}
    return {"id": row.id, "name": row.name, **limits, "pipeline_version_id": row.pipeline_version_id, **times}


def _show(row: dict, as_json: bool, verb: str) -> None:
    if as_json:
        print(json.dumps(row))
        return
    err.print(f"tenant {escape(row['id'])} {verb}")


@tenants_app.command("create")
def tenants_create(
    tenant_id: Annotated[str, typer.Argument(metavar="ID", help="1-63 of a-z, 0-9, '_', '-' (names its queue).")],
    name: NameOpt = None,
    weight: WeightOpt = None,
    rate: RateOpt = None,
    burst: BurstOpt = None,
    backlog_cap: BacklogOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Adds a tenant; then `item keys create --tenant ID` gives it keys."""
    from worker.ledger import tenants

    limits = tenants.TenantLimits(name, weight, rate, burst, backlog_cap)
    _show(_changed(lambda session: tenants.create_tenant(session, tenant_id, limits)), as_json, "created")


@tenants_app.command("list")
def tenants_list(as_json: JsonOpt = False) -> None:
    """Every tenant with its weight, limits, pinned version and whether it is disabled."""
    from worker.ledger import tenants

    rows = in_ledger(lambda session: [tenant_dict(row) for row in tenants.list_tenants(session)])
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    table = Table()
    for column in ("id", "name", "weight", "rate/s", "burst", "backlog cap", "pinned version", "disabled"):
        table.add_column(column, overflow="fold")
    for row in rows:
        limits = [row[key] for key in ("weight", "rate_per_s", "burst", "backlog_cap", "pipeline_version_id")]
        cells = ["" if value is None else str(value) for value in limits]
        table.add_row(escape(row["id"]), escape(row["name"]), *cells, (row["disabled_at"] or "")[:19])
    out.print(table)


@tenants_app.command("set")
def tenants_set(
    tenant_id: Annotated[str, typer.Argument(metavar="ID")],
    name: NameOpt = None,
    weight: WeightOpt = None,
    rate: RateOpt = None,
    burst: BurstOpt = None,
    backlog_cap: BacklogOpt = None,
    no_rate: Annotated[bool, typer.Option("--no-rate", help="Remove the rate limit (and its burst).")] = False,
    no_backlog_cap: Annotated[bool, typer.Option("--no-backlog-cap", help="Remove the backlog cap.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Changes a tenant's name, weight or limits; what is not given stays as it is."""
    from worker.ledger import tenants

    if (no_rate and (rate is not None or burst is not None)) or (no_backlog_cap and backlog_cap is not None):
        raise fail(ValueError("Give a limit or remove it (--no-rate, --no-backlog-cap), not both."))
    clear = (("rate_per_s", "burst") if no_rate else ()) + (("backlog_cap",) if no_backlog_cap else ())
    limits = tenants.TenantLimits(name, weight, rate, burst, backlog_cap)
    _show(_changed(lambda session: tenants.update_tenant(session, tenant_id, limits, clear=clear)), as_json, "changed")


@tenants_app.command("disable")
def tenants_disable(tenant_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOpt = False) -> None:
    """Refuses the tenant's new checks (`tenant.disabled`); its keys still read what it has."""
    from worker.ledger import tenants

    _show(_changed(lambda session: tenants.set_disabled(session, tenant_id, True)), as_json, "disabled")


@tenants_app.command("enable")
def tenants_enable(tenant_id: Annotated[str, typer.Argument(metavar="ID")], as_json: JsonOpt = False) -> None:
    """Takes the tenant's new checks again."""
    from worker.ledger import tenants

    _show(_changed(lambda session: tenants.set_disabled(session, tenant_id, False)), as_json, "enabled")


@tenants_app.command("pin")
def tenants_pin(
    tenant_id: Annotated[str, typer.Argument(metavar="ID")],
    version: Annotated[str | None, typer.Argument(help="A registered version (`item versions list`).")] = None,
    follow_active: Annotated[
        bool, typer.Option("--follow-active", help="Unpin: file under the deployment's active version again.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Files the tenant's new checks under VERSION, whatever version is active (or, with --follow-active, under
    the active one again). Checks already filed keep their version."""
    from worker.ledger import tenants
    from worker.ledger.tenants import TenantError

    if (version is None) == (not follow_active):
        raise fail(ValueError("Give a VERSION or --follow-active (one of the two)."))

    def pin(session):
        if version is not None and version not in {row.id for row in _versions(session)}:
            raise TenantError(f"No version {version!r} is registered; `item versions list` shows them.")
        return tenants.pin_version(session, tenant_id, version)

    row = _changed(pin)
    _show(row, as_json, f"pinned to {row['pipeline_version_id']}" if version else "follows the active version")


def _versions(session):
    from worker.ledger import pipeline_versions

    return pipeline_versions.versions(session)
