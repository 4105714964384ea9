"""`item serve` and `item keys create | list | revoke`: the HTTP API and console, and the keys that open them."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from worker.cli.common import JsonOpt, err, fail, out, require_migrated, settings_from

LIMIT_CONCURRENCY = 1024  # connections and requests a server process holds at once; beyond, 503 at once
KEEP_ALIVE_S = 5  # an idle connection is closed after this

app = typer.Typer()
keys_app = typer.Typer(help="Keys of the HTTP API and console: create, list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on [env ITEM_HTTP_ADDR].")] = None,
    port: Annotated[int | None, typer.Option(help="Port [env ITEM_HTTP_PORT].")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Server processes (each with its own pool).")] = 1,
    log_level: Annotated[str, typer.Option(help="uvicorn's log level.")] = "warning",
    proxy: Annotated[
        str | None,
        typer.Option(help="Address(es) of a TLS proxy in front, whose X-Forwarded-Proto/For are trusted (comma list)."),
    ] = None,
) -> None:
    """Serves the HTTP API (/v1, OpenAPI at /openapi.json) and the console (/console). Runs no model."""
    import uvicorn

    settings = settings_from(http_addr=host, http_port=port)
    require_migrated(settings.database_url)
    # The server processes read their settings from the environment, as every `item` process does.
    os.environ["ITEM_HTTP_ADDR"], os.environ["ITEM_HTTP_PORT"] = settings.http_addr, str(settings.http_port)
    if workers > 1:
        _share_metrics()
    err.print(f"serving on http://{settings.http_addr}:{settings.http_port} (console: /console, API: /v1, /docs)")
    uvicorn.run(
        "worker.web.app:app_from_environment",
        factory=True,
        host=settings.http_addr,
        port=settings.http_port,
        workers=workers,
        log_level=log_level,
        # A client's X-Forwarded-* is trusted only from the named proxy: then the console sees https, and its
        # session cookie is Secure.
        proxy_headers=proxy is not None,
        forwarded_allow_ips=proxy,
        server_header=False,
        limit_concurrency=LIMIT_CONCURRENCY,
        timeout_keep_alive=KEEP_ALIVE_S,
    )


def _share_metrics() -> None:
    """Several server processes: each writes its samples to files that any of them sums at /metrics, so a
    scrape sees the whole server whichever process answers it (prometheus_client's multiprocess mode)."""
    import tempfile

    if "PROMETHEUS_MULTIPROC_DIR" not in os.environ:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="item-serve-metrics-")


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option("--name", help="Who or what uses the key (shown in lists and decisions).")],
    scope: Annotated[list[str], typer.Option("--scope", help="submit, read, review or admin (repeat for several).")],
    tenant: Annotated[
        str | None, typer.Option("--tenant", help="The tenant whose checks it files and reads [default: default].")
    ] = None,
    all_tenants: Annotated[
        bool, typer.Option("--all-tenants", help="An operator key: reads every tenant's checks (never a default).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Makes a key and prints it once: only its hash is stored. A key is one tenant's (--tenant, `default` if not
    given) or, asked for explicitly, an operator key of all tenants (--all-tenants)."""
    from worker.ledger.models import DEFAULT_TENANT
    from worker.ledger.store import Ledger
    from worker.web.keys import create_key

    if all_tenants and tenant is not None:
        raise fail(ValueError("A key is one tenant's (--tenant) or an operator key of all (--all-tenants), not both."))
    tenant_id = None if all_tenants else tenant or DEFAULT_TENANT
    scopes = [part.strip() for value in scope for part in value.split(",") if part.strip()]
    ledger = Ledger(require_migrated(settings_from().database_url))
    try:
        made = create_key(ledger, name, scopes, tenant_id=tenant_id, all_tenants=all_tenants)
    except Exception as error:  # a bad scope or name, or a ledger that is not migrated
        raise fail(error) from None
    finally:
        ledger.dispose()
    if as_json:
        about = {"id": made.key_id, "name": made.name, "scopes": made.scopes, "tenant": made.tenant_id}
        print(json.dumps({"key": made.key, **about}))
        return
    whose = escape(f"tenant {made.tenant_id}" if made.tenant_id else "all tenants")
    err.print(f"key {made.key_id} ({escape(made.name)}, scopes {', '.join(made.scopes)}, {whose}); shown once:")
    print(made.key)


@keys_app.command("list")
def keys_list(
    all_keys: Annotated[bool, typer.Option("--all", help="Revoked keys too.")] = False, as_json: JsonOpt = False
) -> None:
    """Keys by id, name and scopes (never their secrets)."""
    from worker.ledger import access
    from worker.ledger.store import Ledger

    ledger = Ledger(require_migrated(settings_from().database_url))
    with ledger.session() as session:
        rows = [_key_dict(row) for row in access.list_keys(session, include_revoked=all_keys)]
    ledger.dispose()
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    if not rows:
        err.print("no keys: `item keys create --scope read --name NAME`")
        return
    table = Table()
    for column in ("id", "name", "scopes", "tenant", "created", "last used", "revoked"):
        table.add_column(column)
    for row in rows:
        times = [(row[key] or "")[:19].replace("T", " ") for key in ("created_at", "last_used_at", "revoked_at")]
        tenant = escape(row["tenant"]) if row["tenant"] else "[bold]all[/]"
        table.add_row(row["id"], escape(row["name"]), ", ".join(row["scopes"]), tenant, *times)
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="A key's id (k...), or a name: every live key of that name.")],
    as_json: JsonOpt = False,
) -> None:
    """Revokes keys at once for new sign-ins and sessions; servers stop accepting them within 5 seconds."""
    from worker.ledger import access
    from worker.ledger.store import Ledger

    ledger = Ledger(require_migrated(settings_from().database_url))
    with ledger.session() as session:
        revoked = [_key_dict(row) for row in access.revoke_key(session, key)]
    ledger.dispose()
    if as_json:
        print(json.dumps({"revoked": revoked}))
    elif revoked:
        err.print(f"revoked {', '.join(row['id'] for row in revoked)}")
    if not revoked:
        err.print(f"no live key has the id or name {escape(key)!r}")
        raise typer.Exit(1)


def _key_dict(row) -> dict:
    times = {name: getattr(row, name) for name in ("created_at", "last_used_at", "revoked_at")}
    about = {"id": row.id, "name": row.name, "scopes": row.scopes, "tenant": row.tenant_id}  # tenant None: all
    return {**about, **{k: v and v.isoformat() for k, v in times.items()}}
