"""`item secrets create | rotate | retire | list | purge`: the secrets that sign each tenant's callbacks.

A secret is printed once, when it is made (`create`, `rotate`): the platform's receiver needs it, and nothing shows
it again. The ledger keeps it in clear, since the workers sign with it.
"""

from __future__ import annotations

import json
import re
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from worker.cli.common import JsonOpt, err, fail, in_ledger, out, settings_from

app = typer.Typer()
secrets_app = typer.Typer(
    help="Secrets that sign each tenant's callbacks: create, rotate, retire, list, purge.", no_args_is_help=True
)
app.add_typer(secrets_app, name="secrets")

TenantArg = Annotated[str, typer.Option("--tenant", help="The tenant whose callbacks the secret signs.")]
_DURATION = re.compile(r"([0-9]+(?:\.[0-9]+)?)([smhd]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400}


@secrets_app.command("create")
def secrets_create(tenant: TenantArg, as_json: JsonOpt = False) -> None:
    """Makes a tenant's first secret and prints it once (give it to the platform's receiver)."""
    from worker.ledger.callback_secrets import create_secret

    made = in_ledger(lambda session: create_secret(session, tenant))
    _print_made(made, as_json)


@secrets_app.command("rotate")
def secrets_rotate(
    tenant: TenantArg,
    window: Annotated[
        str | None,
        typer.Option(
            "--window",
            help="How long the old secret keeps signing beside the new one: 90s, 30m, 12h, 1d; 0 stops it at "
            "once [env ITEM_CALLBACK_ROTATION_WINDOW_S, default 1d].",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Makes a new secret and prints it once; the old one signs too until the window ends."""
    from worker.ledger.callback_secrets import rotate_secret

    settings = settings_from()
    window_s = settings.callback_rotation_window_s if window is None else _seconds(window)
    made = in_ledger(lambda session: rotate_secret(session, tenant, window_s), settings.database_url)
    _print_made(made, as_json)


@secrets_app.command("retire")
def secrets_retire(
    tenant: TenantArg,
    key_id: Annotated[str, typer.Argument(help="A retiring secret's key id (cs...), from `item secrets list`.")],
    as_json: JsonOpt = False,
) -> None:
    """Stops a retiring secret from signing now (workers stop within 5 seconds)."""
    from worker.ledger.callback_secrets import retire_secret

    row = in_ledger(lambda session: _secret_dict(retire_secret(session, tenant, key_id)))
    if as_json:
        print(json.dumps(row))
    else:
        err.print(f"retired {row['key_id']} of tenant {escape(row['tenant_id'])}")


@secrets_app.command("list")
def secrets_list(
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="Only this tenant's (default: every tenant's).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Secrets by tenant, key id and state (current, retiring until..., retired), never their values."""
    from worker.ledger.callback_secrets import list_secrets

    settings = settings_from()
    rows = in_ledger(
        lambda session: [_secret_dict(row) for row in list_secrets(session, tenant)], settings.database_url
    )
    if settings.callback_secret and settings.callback_secret.get_secret_value() and tenant in (None, "default"):
        rows.insert(0, _unnamed())
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    if not rows:
        err.print("no callback secrets: `item secrets create --tenant TENANT`")
        return
    table = Table()
    for column in ("tenant", "key id", "state", "created", "retires"):
        table.add_column(column)
    for row in rows:
        times = [(row[key] or "")[:19].replace("T", " ") for key in ("created_at", "retires_at")]
        table.add_row(escape(row["tenant_id"]), row["key_id"], row["state"], *times)
    out.print(table)


@secrets_app.command("purge")
def secrets_purge(as_json: JsonOpt = False) -> None:
    """Deletes the secrets that retired (their window ended): they sign nothing any more."""
    from worker.ledger.callback_secrets import purge_retired

    purged = in_ledger(lambda session: purge_retired(session))
    if as_json:
        print(json.dumps({"purged": purged}))
    else:
        err.print(f"{purged} retired secret(s) deleted")


def _print_made(made, as_json: bool) -> None:
    retires_at = made.retires_at and made.retires_at.isoformat()
    if as_json:
        shown = {"tenant_id": made.tenant_id, "key_id": made.key_id, "secret": made.secret}
        print(json.dumps(shown | {"retiring": list(made.retiring), "retires_at": retires_at}))
        return
    if made.retiring:
        err.print(f"{', '.join(made.retiring)} of tenant {escape(made.tenant_id)} signs too until {retires_at}")
    err.print(f"secret {made.key_id} of tenant {escape(made.tenant_id)}; shown only this once:")
    print(made.secret)


def _secret_dict(row) -> dict:
    from worker.ledger.callback_secrets import state

    times = {name: getattr(row, name) and getattr(row, name).isoformat() for name in ("created_at", "retires_at")}
    return {"tenant_id": row.tenant_id, "key_id": row.key_id, "state": state(row), **times}


def _unnamed() -> dict:
    """ITEM_CALLBACK_SECRET: it signs the default tenant's callbacks, without a key id, while it is set."""
    return {
        "tenant_id": "default",
        "key_id": "(ITEM_CALLBACK_SECRET)",
        "state": "current",
        "created_at": None,
        "retires_at": None,
    }


def _seconds(window: str) -> float:
    from worker.ledger.callback_secrets import CallbackSecretError

    match = _DURATION.fullmatch(window.strip())
    if match is None:
        raise fail(CallbackSecretError(f"--window {window!r} is not a duration: a number and s, m, h or d (12h, 1d)."))
    return float(match.group(1)) * _UNIT_S[match.group(2)]
