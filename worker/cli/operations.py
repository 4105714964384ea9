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
    err,
    fail,
    model_store,
    out,
    profile_named,
    settings_from,
)

app = typer.Typer()
models_app = typer.Typer(help="List and fetch the models of a profile.", no_args_is_help=True)
db_app = typer.Typer(help="Migrate the ledger database.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")


@app.command()
def worker(
    beat: Annotated[bool, typer.Option(help="Also run the periodic reconciler in this worker.")] = True,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Processes [env ITEM_WORKER_CONCURRENCY].")] = None,
    loglevel: Annotated[str, typer.Option(help="Celery log level.")] = "INFO",
    queues: Annotated[
        list[str] | None,
        typer.Option("--queue", "-Q", help="Queues to read, first first (default: item.checks, then item.rescore)."),
    ] = None,
) -> None:
    """Start a Celery worker on the check queues (needs ITEM_BROKER_URL and a migrated ledger).

    It reads `item.checks` and, only while that is empty, `item.rescore`; `--queue item.rescore` makes a worker
    that only re-scores (on a spare GPU, say).
    """
    settings = settings_from(worker_concurrency=concurrency)
    if not settings.broker_url:
        raise fail(ValueError("ITEM_BROKER_URL is not set: a worker needs a broker (redis://...)."))
    from worker import exporter, logs

    logs.configure(settings.log_format, loglevel.upper())
    exporter.prepare_multiprocess_dir(settings)  # before anything imports the metrics: children inherit it
    from worker.celery_app import QUEUES
    from worker.tasks import worker_app

    celery = worker_app(settings)  # these settings, command line included, are every pool process's
    if settings.metrics_port:
        exporter.serve(settings)
    chosen = ",".join(queues or QUEUES)  # in this order: fresh checks before re-scores
    argv = ["worker", f"--queues={chosen}", f"--loglevel={loglevel}", "--pool=prefork", "--without-mingle"]
    argv += [f"--concurrency={settings.worker_concurrency}", "--without-gossip"]
    celery.worker_main(argv + (["--beat"] if beat else []))


@app.command()
def metrics(
    port: Annotated[int | None, typer.Option(help="Port [env ITEM_METRICS_PORT].")] = None,
) -> None:
    """Serve /metrics for the worker processes of this host (their ITEM_METRICS_DIR) until interrupted."""
    import time

    from worker import exporter

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
    from worker.health import check_health

    report = check_health(settings_from(), load_models=load_models)
    if as_json:
        print(json.dumps(report))
    else:
        for name, part in report["checks"].items():
            mark = "[green]ok[/]" if part["ok"] else "[red]FAIL[/]"
            out.print(f"{mark} {name}: {escape(part['detail'])}", soft_wrap=True)
    raise typer.Exit(0 if report["ok"] else 1)


@app.command()
def reconcile() -> None:
    """Re-queue checks stuck queued/running past ITEM_RECONCILE_AFTER_S (workers also do this periodically)."""
    from pipeline.core.errors import ItemError
    from worker.celery_app import enqueuer, make_celery
    from worker.runtime import build_service

    settings = settings_from()
    try:
        count = build_service(settings, enqueue=enqueuer(make_celery(settings))).reconcile()
    except ItemError as error:
        raise fail(error) from None
    out.print(f"re-queued {count} stuck checks")


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


@db_app.command("current")
def db_current() -> None:
    """Print the ledger's migration revision."""
    from worker.ledger import migrate

    out.print(str(migrate.current(settings_from().database_url)))


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
    """Download (or, for tiny, generate) a profile's models into the model folder."""
    from pipeline.core.errors import ItemError

    settings = settings_from(profile=profile, model_dir=model_dir)
    store = model_store(settings, offline=False)
    for stage, spec in profile_named(settings.profile).specs.items():
        if store.is_present(spec):
            err.print(f"{stage}: {spec.name} already present")
            continue
        err.print(f"{stage}: fetching {spec.source} …")
        try:
            store.pull(spec)
        except ItemError as error:
            raise fail(error) from None
    out.print(f"profile {settings.profile} ready in {store.model_dir}")
