"""The `item` command line. Commands parse options, call plain functions, and render the results.

Exit status: 0 all good; 1 some input failed (each failure is in its row); 2 nothing could run (bad option,
unknown profile, missing model, unusable head).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from worker.settings import Settings

app = typer.Typer(help="ITEM: detect AI-generated images by image-text misalignment.", no_args_is_help=True)
models_app = typer.Typer(help="List and fetch the models of a profile.", no_args_is_help=True)
db_app = typer.Typer(help="Migrate the ledger database.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(db_app, name="db")
out = Console()
err = Console(stderr=True)

ProfileOpt = Annotated[str | None, typer.Option("--profile", "-p", help="Model profile (paper, small, tiny).")]
ModelDirOpt = Annotated[Path | None, typer.Option("--model-dir", help="Model folder [env ITEM_MODEL_DIR].")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never download; missing models are an error.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout.")]


def main() -> None:
    _quiet_libraries()
    app()


def _quiet_libraries() -> None:
    """Model libraries log loading chatter and progress bars; ours are the ones the user asked for.

    Set through their environment variables, so `item --help` does not pay for importing them.
    """
    for name, value in (
        ("TRANSFORMERS_VERBOSITY", "error"),
        ("HF_HUB_DISABLE_PROGRESS_BARS", "1"),
        ("TOKENIZERS_PARALLELISM", "false"),
    ):
        os.environ.setdefault(name, value)
    logging.getLogger().setLevel(logging.ERROR)


def _settings(**overrides) -> Settings:
    return Settings(**{key: value for key, value in overrides.items() if value is not None})


def _store(settings: Settings, offline: bool):
    from pipeline.core.model_store import ModelStore

    return ModelStore(settings.model_dir, allow_download=settings.allow_download and not offline)


def _fail(error: Exception) -> typer.Exit:
    code = getattr(error, "code", type(error).__name__)
    err.print(f"[bold red]error[/] {escape(f'[{code}]')} {escape(str(error))}")
    return typer.Exit(2)


def _progress(total: int, label: str) -> Progress:
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=True,
    )


@app.command()
def scan(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (scanned recursively).")],
    profile: ProfileOpt = None,
    head: Annotated[Path | None, typer.Option(help="Head .safetensors [env ITEM_HEAD].")] = None,
    model_dir: ModelDirOpt = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per model batch.")] = None,
    offline: OfflineOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score images in-process and print a table (or JSON lines). Bad files get an error row."""
    from pipeline.core.files import collect_files
    from pipeline.core.scan import scan as run_scan

    settings = _settings(profile=profile, head=head, model_dir=model_dir, device=device, batch_size=batch_size)
    detector = _detector(settings, offline)
    files = collect_files(paths)
    table, failed = _scan_table(detector), 0
    with _progress(len(files), "scanning") as bar:
        task = bar.add_task("scan", total=len(files))
        limits = {"max_pixels": settings.max_pixels, "max_bytes": settings.max_image_bytes}
        for row in run_scan(files, detector, batch_size=settings.batch_size, **limits):
            bar.advance(task)
            failed += row.error is not None
            if as_json:
                print(json.dumps(row.to_dict()), flush=True)
            else:
                _add_scan_row(table, row)  # display cells only: rows and their tensors are not kept
    if not as_json:
        out.print(table)
        if detector.profile.meaningless_scores:
            err.print("[yellow]note[/] the tiny profile's models are random: these scores show the plumbing only.")
    if failed:
        err.print(f"{failed} of {len(files)} files could not be checked.")
    raise typer.Exit(1 if failed else 0)


def _detector(settings: Settings, offline: bool):
    from pipeline.core.errors import ItemError
    from worker.runtime import build_detector

    try:
        detector = build_detector(
            settings.model_copy(update={"allow_download": settings.allow_download and not offline})
        )
        with err.status(f"loading the {detector.profile.name} models…"):
            detector.load()  # now, so a broken model is one clear error rather than a failure mid-scan
        return detector
    except (ItemError, ValueError) as error:
        raise _fail(error) from None


def _scan_table(detector) -> Table:
    table = Table(title=f"ITEM scan · profile {detector.profile.name} · {detector.pipeline_version.id}")
    for column in ("file", "verdict", "p(fake)", "objects", "caption / error"):
        table.add_column(column, overflow="fold")
    return table


def _add_scan_row(table: Table, row) -> None:
    if row.error:
        message = f"[red]{escape(row.error.code)}[/] {escape(row.error.message)}"
        table.add_row(escape(str(row.path)), "[red]error[/]", "", "", message)
        return
    d = row.detection
    style = "magenta" if d.verdict == "fake" else "green"
    cells = (f"[{style}]{d.verdict}[/]", f"{d.p_fake:.3f}", str(d.object_count), escape(d.caption))
    table.add_row(escape(str(row.path)), *cells)


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the images and the trained head.")] = Path(
        "item-demo"
    ),
    model_dir: ModelDirOpt = None,
    per_family: Annotated[int, typer.Option(min=2, help="Images per family.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed for images and training.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole method offline on the tiny profile: make data, train a head, score held-out images."""
    from pipeline.lab.demo import run_demo

    settings = _settings(model_dir=model_dir)
    err.print(
        "[yellow]The tiny profile uses small random models: this demo shows the plumbing end to end, "
        "not detection quality.[/]"
    )
    with _progress(2 * per_family, "extracting features") as bar:
        task = bar.add_task("features", total=2 * per_family)
        report = run_demo(
            out_dir,
            _store(settings, offline=True),
            per_family=per_family,
            seed=seed,
            batch_size=settings.batch_size,
            progress=lambda n: bar.advance(task, n),
        )
    if as_json:
        for path, label, detection in report.test:
            print(json.dumps({"path": str(path), "label": label, **detection.to_dict()}))
    else:
        _print_demo(report)


def _print_demo(report) -> None:
    table = Table(title="held-out images")
    for column in ("file", "truth", "verdict", "p(fake)", "caption"):
        table.add_column(column, overflow="fold")
    for path, label, d in report.test:
        table.add_row(path.name, ("real", "fake")[label], d.verdict, f"{d.p_fake:.3f}", d.caption)
    out.print(table)
    correct = round(report.accuracy * len(report.test))
    out.print(
        f"accuracy on {len(report.test)} held-out images: {report.accuracy:.1%} ({correct} correct); "
        f"head trained on {report.n_train} images"
    )
    out.print(f"head written to {report.head_path}", soft_wrap=True)
    out.print(f"next: item scan --profile tiny --head {report.head_path} {report.image_dir}", soft_wrap=True)


@models_app.command("list")
def models_list(profile: ProfileOpt = None, model_dir: ModelDirOpt = None, as_json: JsonOpt = False) -> None:
    """Show every profile's models (or one profile's) and whether they are in the model folder."""
    from pipeline.core.profiles import PROFILES

    settings = _settings(model_dir=model_dir)
    store = _store(settings, offline=True)
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
        for stage, spec in _profile(name).specs.items()
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

    settings = _settings(profile=profile, model_dir=model_dir)
    store = _store(settings, offline=False)
    for stage, spec in _profile(settings.profile).specs.items():
        if store.is_present(spec):
            err.print(f"{stage}: {spec.name} already present")
            continue
        err.print(f"{stage}: fetching {spec.source} …")
        try:
            store.pull(spec)
        except ItemError as error:
            raise _fail(error) from None
    out.print(f"profile {settings.profile} ready in {store.model_dir}")


# ---------------------------------------------------------------------- the service


@app.command()
def submit(
    inputs: Annotated[list[str], typer.Argument(help="Image files, http(s) URLs or s3://bucket/key.")],
    external_id: Annotated[
        list[str] | None, typer.Option("--external-id", "-e", help="One per input; default: the input itself.")
    ] = None,
    by_path: Annotated[bool, typer.Option(help="Send local files by path (worker shares the disk).")] = False,
    callback_url: Annotated[
        str | None, typer.Option(help="POST each result here, signed with ITEM_CALLBACK_SECRET.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Record checks in the ledger, then queue them (or, with no ITEM_BROKER_URL, run them here).

    Inputs are image files, http(s) URLs, or s3://bucket/key objects (read with the ITEM_S3_* settings).
    """
    from pipeline.core.errors import ItemError
    from worker.client import image_from
    from worker.client import submit as submit_checks

    ids = external_id or inputs
    if len(ids) != len(inputs):
        raise _fail(ValueError(f"{len(inputs)} inputs but {len(ids)} --external-id values."))
    try:
        items = [(eid, image_from(ref, by_path=by_path)) for eid, ref in zip(ids, inputs, strict=True)]
        submissions = submit_checks(_settings(), items, callback_url=callback_url)
    except ItemError as error:
        raise _fail(error) from None
    for s in submissions:
        if as_json:
            print(json.dumps({"check_id": s.check_id, "external_id": s.external_id, "created": s.created}))
        else:
            out.print(f"{s.check_id}  {escape(s.external_id)}{'' if s.created else '  (exists)'}", soft_wrap=True)


@app.command()
def status(
    check_ids: Annotated[list[str] | None, typer.Argument(help="Check ids; none: counts by status.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """One line per check (status, verdict, error), or the number of checks in each status."""
    from worker.ledger.store import Ledger

    ledger = Ledger(_settings().database_url)
    with ledger.session() as session:
        if not check_ids:
            counts = ledger.count_by_status(session)
            print(json.dumps(counts) if as_json else "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
            return
        rows = [ledger.get_check(session, check_id) for check_id in check_ids]
    missing = [cid for cid, row in zip(check_ids, rows, strict=True) if row is None]
    _print_checks([row for row in rows if row is not None], as_json)
    if missing:
        err.print(f"no such check: {', '.join(missing)}")
        raise typer.Exit(1)


@app.command()
def results(
    status_: Annotated[str | None, typer.Option("--status", help="queued, running, done, rejected, failed.")] = None,
    verdict: Annotated[str | None, typer.Option(help="real or fake.")] = None,
    since: Annotated[datetime | None, typer.Option(help="Created at or after (ISO time, UTC).")] = None,
    until: Annotated[datetime | None, typer.Option(help="Created before (ISO time, UTC).")] = None,
    external_id: Annotated[
        str | None, typer.Option("--external-id", "-e", help="One upload: its check under every version.")
    ] = None,
    version: Annotated[str | None, typer.Option(help="Only checks scored under this pipeline version.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Checks from the ledger, newest first, filtered. After a re-score, each version keeps its own result."""
    from worker.client import checks

    rows = checks(
        _settings(),
        status=status_,
        verdict=verdict,
        since=_utc(since),
        until=_utc(until),
        external_id=external_id,
        pipeline_version_id=version,
        limit=limit,
    )
    _print_checks(rows, as_json)


def _utc(moment: datetime | None) -> datetime | None:
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def _print_checks(rows, as_json: bool) -> None:
    from worker.client import check_dict

    if as_json:
        for row in rows:
            print(json.dumps(check_dict(row)))
        return
    table = Table()
    for column in ("check", "external id", "version", "status", "verdict", "p(fake)", "error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        p_fake = "" if row.p_fake is None else f"{row.p_fake:.3f}"
        cells = (row.pipeline_version_id, row.status, row.verdict or "", p_fake, row.error_code or "")
        table.add_row(row.id, escape(row.external_id), *cells)
    out.print(table)


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
    settings = _settings()
    if not settings.broker_url:
        raise _fail(ValueError("ITEM_BROKER_URL is not set: a worker needs a broker (redis://...)."))
    from worker import exporter, logs

    logs.configure(settings.log_format, loglevel.upper())
    exporter.prepare_multiprocess_dir(settings)  # before anything imports the metrics: children inherit it
    from worker.celery_app import QUEUES
    from worker.celery_app import app as celery_app

    if settings.metrics_port:
        exporter.serve(settings)
    chosen = ",".join(queues or QUEUES)  # in this order: fresh checks before re-scores
    argv = ["worker", f"--queues={chosen}", f"--loglevel={loglevel}", "--pool=prefork", "--without-mingle"]
    argv += [f"--concurrency={concurrency or settings.worker_concurrency}", "--without-gossip"]
    celery_app.worker_main(argv + (["--beat"] if beat else []))


@app.command()
def metrics(
    port: Annotated[int | None, typer.Option(help="Port [env ITEM_METRICS_PORT].")] = None,
) -> None:
    """Serve /metrics for the worker processes of this host (their ITEM_METRICS_DIR) until interrupted."""
    import time

    from worker import exporter

    settings = _settings(metrics_port=port)
    if settings.metrics_dir is None:
        raise _fail(ValueError("Set ITEM_METRICS_DIR to the folder the workers of this host write to."))
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

    report = check_health(_settings(), load_models=load_models)
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
    from worker.runtime import build_service
    from worker.tasks import send_check

    try:
        count = build_service(_settings(), enqueue=send_check).reconcile()
    except ItemError as error:
        raise _fail(error) from None
    out.print(f"re-queued {count} stuck checks")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument()] = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    from worker.ledger import migrate

    migrate.upgrade(_settings().database_url, revision)
    out.print(f"ledger at {migrate.current(_settings().database_url)}")


@db_app.command("downgrade")
def db_downgrade(revision: Annotated[str, typer.Argument(help="Target revision, e.g. base.")]) -> None:
    """Undo migrations down to REVISION."""
    from worker.ledger import migrate

    migrate.downgrade(_settings().database_url, revision)
    out.print(f"ledger at {migrate.current(_settings().database_url)}")


@db_app.command("current")
def db_current() -> None:
    """Print the ledger's migration revision."""
    from worker.ledger import migrate

    out.print(str(migrate.current(_settings().database_url)))


def _profile(name: str):
    from pipeline.core.errors import ItemError
    from pipeline.core.profiles import get_profile

    try:
        return get_profile(name)
    except ItemError as error:
        raise _fail(error) from None


# The experiment commands (features, train, eval, calibrate), `versions`/`rescore` and `deliveries` live in their
# own modules and register on `app`.
from worker import cli_delivery, cli_experiments, cli_rescore  # noqa: E402, F401

if __name__ == "__main__":
    sys.exit(main())
