"""`item worker | metrics | health | reconcile | db | models`: running and looking after the service."""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from worker.cli.common import (
    JsonOpt,
    ModelDirOpt,
    ProfileOpt,
    TenantOpt,
    err,
    fail,
    model_store,
    out,
    profile_named,
    settings_from,
)

app = typer.Typer()
models_app = typer.Typer(help="List and fetch the models of a profile.", no_args_is_help=True)
db_app = typer.Typer(help="Migrate and maintain the ledger database.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")


@app.command()
def worker(
    concurrency: Annotated[
        int | None,
        typer.Option(min=0, help="GPU loop processes, one per GPU; 0: intake only [env ITEM_WORKER_CONCURRENCY]."),
    ] = None,
    intake: Annotated[bool, typer.Option(help="Also file the broker's item.check messages in the ledger.")] = True,
    reconcile: Annotated[bool, typer.Option(help="Take part in running the deployment's reconciler.")] = True,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Run a Celery worker: the item.check intake, GPU loops claiming checks from the ledger, deliveries, metrics.

    The same worker as `celery -A worker.intake.app worker --gpus N`, with this project's defaults (its own node
    name, no mingle or gossip, JSON logs). Needs ITEM_BROKER_URL (redis:// or amqp://) and a migrated ledger
    (`item db upgrade`). Each GPU loop loads its models, registers its pipeline version and then claims batches
    of that version; a new version takes fresh uploads only once activated (`item versions activate`, or
    ITEM_ACTIVATE_ON_START). Celery's tools see it: `celery -A worker.intake.app inspect item`, Flower.
    """
    import socket

    settings = settings_from(worker_concurrency=concurrency)
    if not settings.broker_url:
        raise fail(ValueError("ITEM_BROKER_URL is not set: a worker takes its messages and commands from a broker."))
    from worker.ledger import migrate

    if not migrate.is_up_to_date(settings.database_url):
        raise fail(ValueError(f"The ledger is not at revision {migrate.head()}: run `item db upgrade` first."))
    from worker.intake.app import create_app, run_celery

    argv = [
        "--quiet", "worker", "--loglevel", loglevel.upper(), "--hostname", f"item-{os.getpid()}@{socket.gethostname()}",
        "--without-mingle", "--without-gossip", "--gpus", str(settings.worker_concurrency),
    ]  # fmt: skip
    argv += [] if intake else ["--no-intake"]
    argv += [] if reconcile else ["--no-reconcile"]
    raise typer.Exit(run_celery(create_app(settings), argv))


@app.command()
def deadletters(
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many, newest first.")] = 100,
    tenant: TenantOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Messages the intake could not file as checks (not JSON, another task, no usable external id); with --tenant
    those that came in on that tenant's queue (a letter of no known tenant shows only without it)."""
    from worker.ledger.store import Ledger

    ledger = Ledger(settings_from().database_url)
    with ledger.session() as session:
        rows = ledger.dead_letters(session, limit=limit, tenant_id=tenant)
    if as_json:
        for row in rows:
            print(json.dumps(_dead_letter_dict(row)))
        return
    if not rows:
        err.print("no dead letters")
        return
    table = Table()
    for column in ("received", "code", "reason", "task", "content type", "body"):
        table.add_column(column, overflow="fold")
    for row in rows:
        shown = (row.body or "")[:120]
        cells = (row.code, escape(row.reason), escape(row.task or ""), escape(row.content_type or ""), escape(shown))
        table.add_row(row.received_at.isoformat()[:19].replace("T", " "), *cells)
    out.print(table)


def _dead_letter_dict(row) -> dict:
    fields = ("id", "code", "reason", "queue", "task", "content_type", "body")
    about = {"received_at": row.received_at.isoformat(), "tenant": row.tenant_id}
    return {**about, **{field: getattr(row, field) for field in fields}}


@app.command()
def metrics(
    port: Annotated[int | None, typer.Option(help="Port [env ITEM_METRICS_PORT].")] = None,
) -> None:
    """Serve /metrics for the worker processes of this host (their ITEM_METRICS_DIR) until interrupted."""
    import time

    from worker.ops import exporter

    settings = settings_from(metrics_port=port)
    if settings.metrics_dir is None:
        raise fail(ValueError("Set ITEM_METRICS_DIR to the folder the workers of this host write to."))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(settings.metrics_dir)
    exporter.serve(settings)
    out.print(f"serving http://{settings.metrics_addr}:{settings.metrics_port}/metrics", soft_wrap=True)
    while True:
        time.sleep(3600)


@app.command()
def health(
    as_json: JsonOpt = False,
    load_models: Annotated[bool, typer.Option(help="Also load every model (slow; proves the weights load).")] = False,
) -> None:
    """Database reachable and migrated, broker reachable, models loadable: exit 0, else 1 (a container probe)."""
    from worker.ops.health import check_health

    report = check_health(settings_from(), load_models=load_models)
    if as_json:
        print(json.dumps(report))
    else:
        for name, part in report["checks"].items():
            mark = "[green]ok[/]" if part["ok"] else "[red]FAIL[/]"
            out.print(f"{mark} {name}: {escape(part['detail'])}", soft_wrap=True)
    raise typer.Exit(0 if report["ok"] else 1)


@app.command()
def reconcile(as_json: JsonOpt = False) -> None:
    """Fail checks every attempt of which died with its worker, count those no worker moves, and delete old
    thumbnails and expired console sessions (workers also run this every ITEM_RECONCILE_INTERVAL_S, once per
    deployment)."""
    from worker.ledger.store import Ledger
    from worker.ops.reconciler import reconcile as reconcile_once

    settings = settings_from()
    result = reconcile_once(settings, Ledger(settings.database_url))
    if as_json:
        purged = {"thumbnails_purged": result.thumbnails_purged, "sessions_purged": result.sessions_purged}
        print(json.dumps({"failed": result.failed, "stuck": result.stuck, **purged}))
        return
    stuck = ", ".join(f"{count} {status}" for status, count in result.stuck.items() if count) or "none"
    out.print(f"failed {result.failed} abandoned checks (check.stuck); stuck, no worker moving them: {stuck}")
    out.print(f"deleted {result.thumbnails_purged} old thumbnails, {result.sessions_purged} expired console sessions")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from worker.ledger import migrate

    url = settings_from().database_url
    migrate.upgrade(url, revision)
    out.print(f"ledger at {migrate.current(url)}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. base.")]) -> None:
    """Undo migrations down to REVISION."""
    from worker.ledger import migrate

    url = settings_from().database_url
    migrate.downgrade(url, revision)
    out.print(f"ledger at {migrate.current(url)}")


@db_app.command("maintain")
def db_maintain(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go; change nothing.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make partitions ahead and drop every day past its retention (ITEM_RETAIN_*_DAYS), checks archived first.

    The deployment's reconciler runs this every ITEM_MAINTAIN_INTERVAL_S; run it by hand after changing a
    retention, or with --dry-run to see what a retention would drop.
    """
    from worker.ledger.engine import make_engine
    from worker.ledger.retention import Policy, maintain

    settings = settings_from()
    engine = make_engine(settings.database_url)
    try:
        report = maintain(
            engine, Policy.from_settings(settings), dry_run=dry_run, progress=_quiet if as_json else err.print
        )
    finally:
        engine.dispose()
    if as_json:
        print(json.dumps({"dry_run": dry_run, **report.to_dict()}))
        return
    verb = "would drop" if dry_run else "dropped"
    out.print(f"made {len(report.made)} partitions ahead; {verb} {len(report.dropped)} expired days", highlight=False)
    for line in report.kept:
        out.print(f"kept {escape(line)}", highlight=False)
    for path in report.archived:
        out.print(f"archived {escape(path)}", highlight=False)


def _quiet(_line: str) -> None:
    return None


@db_app.command("current")
def db_current() -> None:
    """Print the ledger's migration revision."""
    from worker.ledger import migrate

    out.print(str(migrate.current(settings_from().database_url)))


@db_app.command("wait")
def db_wait(
    timeout: Annotated[float, typer.Option(min=0, help="Give up after this many seconds (exit 1).")] = 600.0,
    every: Annotated[float, typer.Option(min=0.1, help="Seconds between looks.")] = 3.0,
) -> None:
    """Wait until the ledger is reachable and at this code's newest revision: a pod's init container, so a new
    release's workers start once its migrations ran (the `item db upgrade` Job) instead of failing until then."""
    import time

    from worker.ledger import migrate

    url, wanted = settings_from().database_url, migrate.head()
    deadline, seen = time.monotonic() + timeout, "not asked yet"
    while True:
        try:
            seen = migrate.current(url) or "empty"
        except Exception as error:  # noqa: BLE001  (unreachable, refused, DNS not ready: all mean "wait")
            seen = f"unreachable ({type(error).__name__})"
        if seen == wanted:
            out.print(f"ledger at {wanted}")
            return
        if time.monotonic() >= deadline:
            err.print(f"the ledger is {seen}, not at {wanted}, after {timeout:.0f}s: run `item db upgrade`")
            raise typer.Exit(1)
        time.sleep(every)


@models_app.command("list")
def models_list(profile: ProfileOpt = None, model_dir: ModelDirOpt = None, as_json: JsonOpt = False) -> None:
    """Show every profile's models (or one profile's) and whether they are in the model folder."""
    from pipeline.core.profiles import PROFILES

    store = model_store(settings_from(model_dir=model_dir), offline=True)
    names = [profile] if profile else sorted(PROFILES)
    rows = [
        {
            "profile": name,
            "stage": stage,
            "model": spec.name,
            "source": spec.source,
            "present": store.is_present(spec),
            "path": str(store.folder(spec)),
        }
        for name in names
        for stage, spec in profile_named(name).specs.items()
    ]
    if as_json:
        print("\n".join(json.dumps(row) for row in rows))
        return
    table = Table(title=f"models in {store.model_dir}")
    for column in ("profile", "stage", "model", "source", "present"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["profile"], row["stage"], row["model"], row["source"], "yes" if row["present"] else "no")
    out.print(table)


@models_app.command("pull")
def models_pull(profile: ProfileOpt = None, model_dir: ModelDirOpt = None) -> None:
    """Download (or, for tiny and the -random profiles, generate) a profile's models into the model folder."""
    from pipeline.core.errors import ItemError

    settings = settings_from(profile=profile, model_dir=model_dir)
    store = model_store(settings, offline=False)
    for stage, spec in profile_named(settings.profile).specs.items():
        if store.is_present(spec):
            err.print(f"{stage}: {spec.name} already present")
            continue
        err.print(f"{stage}: {'generating' if spec.generated else 'fetching'} {spec.source} …")
        try:
            store.pull(spec)
        except ItemError as error:
            raise fail(error) from None
    out.print(f"profile {settings.profile} ready in {store.model_dir}")
