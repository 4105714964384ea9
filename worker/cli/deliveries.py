"""`item deliveries list | retry`: the outbox of results pushed to platforms (callbacks, the results stream).

A delivery that kept failing ends `failed` with its last error; once the receiver is fixed, `retry` sends it
again from the start (attempts reset), through the workers' deliverers as usual.
"""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from worker.cli.common import JsonOpt, TenantOpt, err, fail, out, settings_from
from worker.ledger.states import DeliveryStatus

app = typer.Typer()
deliveries_app = typer.Typer(help="Results pushed to platforms: list them, resend failed ones.", no_args_is_help=True)
app.add_typer(deliveries_app, name="deliveries")


@deliveries_app.command("list")
def deliveries_list(
    status: Annotated[DeliveryStatus | None, typer.Option("--status", help="Only deliveries in this status.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many, newest first.")] = 100,
    tenant: TenantOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Deliveries newest first: target, status, attempts, last error."""
    from worker.ledger.outbox import list_deliveries
    from worker.ledger.store import Ledger
    from worker.ledger.views import delivery_dict

    ledger = Ledger(settings_from().database_url)
    with ledger.session() as session:
        found = list_deliveries(session, status=status, limit=limit, tenant_id=tenant)
        rows = [{**delivery_dict(row), "tenant": row.tenant_id} for row in found]
    ledger.dispose()
    if as_json:
        for row in rows:
            print(json.dumps(row))
        return
    if not rows:
        err.print(f"no {status.value + ' ' if status else ''}deliveries")
        return
    table = Table()
    for column in ("delivery", "check", "kind", "target", "status", "attempts", "last error", "created", "next / done"):
        table.add_column(column, overflow="fold")
    for row in rows:
        when = row["delivered_at"] if row["status"] == "delivered" else row["next_attempt_at"]
        if row["status"] == "failed":
            when = ""
        cells = (row["id"], row["check_id"], row["kind"], escape(row["target"]), row["status"], str(row["attempts"]))
        table.add_row(*cells, escape(row["last_error"] or ""), _short_time(row["created_at"]), _short_time(when))
    out.print(table)


def _short_time(moment: str | None) -> str:
    return moment[:19].replace("T", " ") if moment else ""


@deliveries_app.command("retry")
def deliveries_retry(
    ids: Annotated[list[str] | None, typer.Argument(help="Delivery ids (from `item deliveries list`).")] = None,
    all_failed: Annotated[bool, typer.Option("--all-failed", help="Every failed delivery.")] = False,
) -> None:
    """Send failed deliveries again: back to pending, attempts reset, due now."""
    from worker.ledger.outbox import retry_failed
    from worker.ledger.store import Ledger

    if all_failed == bool(ids):
        raise fail(ValueError("Give delivery ids or --all-failed (one of the two)."))
    ledger = Ledger(settings_from().database_url)
    with ledger.session() as session:
        retried = retry_failed(session, None if all_failed else list(dict.fromkeys(ids)))
    ledger.dispose()
    out.print(f"{len(retried)} deliveries will be sent again")
    skipped = [delivery_id for delivery_id in ids or [] if delivery_id not in retried]
    if skipped:
        err.print(f"not failed or no such delivery: {', '.join(skipped)}")
        raise typer.Exit(1)
