"""`item backlog`: the work waiting for GPU workers, and how many workers it needs (an autoscaler's input)."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from worker.cli.common import JsonOpt, fail, out, settings_from

app = typer.Typer()

VersionOpt = Annotated[
    list[str] | None, typer.Option("--version", help="Only this pipeline version's checks (repeatable).")
]


@app.command()
def backlog(
    versions: VersionOpt = None,
    per_worker: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Claimable checks one worker takes on: default ITEM_BATCH_SIZE x "
            "ITEM_WORKER_CONCURRENCY (its GPU loops).",
        ),
    ] = None,  # fmt: skip
    minimum: Annotated[int, typer.Option("--min", min=0, help="Never ask for fewer workers (a floor).")] = 0,
    maximum: Annotated[int | None, typer.Option("--max", min=0, help="Never ask for more workers.")] = None,
    keda_query: Annotated[
        bool, typer.Option("--keda-query", help="Print the SQL of KEDA's PostgreSQL triggers instead; reads nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Claimable checks (fresh and re-scores, per version), checks in flight, retries not yet due, the workers
    holding work, and the workers wanted: max(busy, ceil(claimable / per-worker)), within --min and --max.

    The same counts as the KEDA ScaledObject of ops/k8s (`--keda-query` prints its queries); other autoscalers
    can poll `item backlog --json` and read `desired_workers`.
    """
    from worker.ledger.backlog import keda_queries, read_backlog

    settings = settings_from()
    if keda_query:
        try:
            queries = keda_queries(max_attempts=settings.max_attempts, versions=versions)
        except ValueError as error:
            raise fail(error) from None
        print(json.dumps(queries) if as_json else "\n".join(f"{name}: {sql}" for name, sql in queries.items()))
        return
    from worker.ledger.store import Ledger

    per_worker = per_worker or max(1, settings.batch_size * max(1, settings.worker_concurrency))
    with Ledger(settings.database_url).session() as session:
        found = read_backlog(session, max_attempts=settings.max_attempts, versions=versions)
    report = found.to_dict(per_worker, minimum=minimum, maximum=maximum)
    if as_json:
        print(json.dumps(report))
        return
    _print(report)


def _print(report: dict) -> None:
    table = Table("version", "claimable", "fresh", "re-scores", "expired leases", "running", "not due", "exhausted")
    for version_id, counts in report["versions"].items():
        names = ("claimable", "fresh", "rescore", "expired_leases", "running", "not_due", "exhausted")
        table.add_row(version_id, *(str(counts[name]) for name in names))
    if report["versions"]:
        out.print(table)
    else:
        out.print("nothing queued or running")
    out.print(
        f"{report['claimable']} claimable, {report['running']} in flight on {report['busy_workers']} busy worker(s); "
        f"{report['per_worker']} per worker: [bold]{report['desired_workers']} worker(s) wanted[/]"
    )
