"""`item scan | submit | status | results`: checking images, in this process or through the service.

The client side (`submit` with a broker, `status`, `results`) imports no model library: it starts in a blink.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from worker.cli.common import (
    JsonOpt,
    ModelDirOpt,
    OfflineOpt,
    ProfileOpt,
    TenantOpt,
    as_utc,
    err,
    fail,
    out,
    progress,
    settings_from,
)

app = typer.Typer()


@app.command()
def scan(
    paths: Annotated[list[Path], typer.Argument(help="Image files or folders (scanned recursively).")],
    profile: ProfileOpt = None,
    head: Annotated[Path | None, typer.Option(help="Head .safetensors, or `untrained` (random profiles).")] = None,
    model_dir: ModelDirOpt = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1, help="Images per model batch.")] = None,
    offline: OfflineOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Score images in-process and print a table (or JSON lines). Bad files get an error row."""
    from pipeline.core.errors import ItemError
    from pipeline.core.files import collect_files
    from pipeline.core.scan import scan as run_scan
    from worker.sources.provenance import provenance_reader

    settings = settings_from(profile=profile, head=head, model_dir=model_dir, device=device, batch_size=batch_size)
    detector = _loaded_detector(settings, offline)
    try:
        reader = provenance_reader(settings)
    except ItemError as error:
        raise fail(error) from None
    files = collect_files(paths)
    table, failed = _scan_table(detector), 0
    with progress("scanning") as bar:
        task = bar.add_task("scan", total=len(files))
        limits = {"max_pixels": settings.max_pixels, "max_bytes": settings.max_image_bytes}
        for row in run_scan(files, detector, batch_size=settings.batch_size, provenance=reader, **limits):
            bar.advance(task)
            failed += row.error is not None
            if as_json:
                print(json.dumps(row.to_dict()), flush=True)
            else:
                _add_scan_row(table, row)  # display cells only: rows and their tensors are not kept
    if not as_json:
        out.print(table)
        if detector.profile.meaningless_scores:
            name = detector.profile.name
            err.print(f"[yellow]note[/] the {name} profile's models are random: these scores show the plumbing only.")
    if failed:
        err.print(f"{failed} of {len(files)} files could not be checked.")
    raise typer.Exit(1 if failed else 0)


def _loaded_detector(settings, offline: bool):
    from pipeline.core.errors import ItemError
    from worker.gpu.build import build_detector

    try:
        detector = build_detector(
            settings.model_copy(update={"allow_download": settings.allow_download and not offline})
        )
        with err.status(f"loading the {detector.profile.name} models…"):
            detector.load()  # now, so a broken model is one clear error rather than a failure mid-scan
        return detector
    except (ItemError, ValueError) as error:
        raise fail(error) from None


def _scan_table(detector) -> Table:
    table = Table(title=f"ITEM scan · profile {detector.profile.name} · {detector.pipeline_version.id}")
    columns = ["file", "verdict", "p(fake)", "objects", "provenance", "caption / error"]
    if detector.head is not None and detector.head.attributes:
        columns.insert(3, "generator")
    for column in columns:
        table.add_column(column, overflow="fold")
    return table


def _add_scan_row(table: Table, row) -> None:
    attributes = any(column.header == "generator" for column in table.columns)
    if row.error:
        message = f"[red]{escape(row.error.code)}[/] {escape(row.error.message)}"
        table.add_row(escape(str(row.path)), "[red]error[/]", *[""] * (4 + attributes), message)
        return
    d = row.detection
    style = {"fake": "magenta", "uncertain": "yellow"}.get(d.verdict, "green")
    verdict = f"[{style}]{d.verdict}[/]" + (f" ({escape(d.verdict_reason)})" if d.decided_by else "")
    cells = [verdict, f"{d.p_fake:.3f}", str(d.object_count), _provenance_cell(d.provenance), escape(d.caption)]
    if attributes:
        top = d.attribution[0] if d.attribution else None
        cells.insert(2, escape(f"{top['generator']} {top['p']:.2f}") if top else "")
    table.add_row(escape(str(row.path)), *cells)


def _provenance_cell(provenance) -> str:
    """`c2pa valid: AI`, `xmp: AI`, `c2pa invalid`...: what the bytes declare, in a few words."""
    if provenance is None:
        return ""
    parts = []
    if provenance.c2pa is not None:
        parts.append(f"c2pa {provenance.c2pa.validation_state}" + (": AI" if provenance.c2pa.ai_generated else ""))
    if provenance.xmp is not None and provenance.xmp.digital_source_type:
        parts.append("xmp: AI" if provenance.xmp.ai_generated else "xmp")
    parts = [escape(part) for part in parts] + [f"[red]{escape(error.code)}[/]" for error in provenance.errors[:1]]
    return ", ".join(parts)


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
    tenant: Annotated[str, typer.Option("--tenant", help="The tenant the checks are filed for.")] = "default",
    as_json: JsonOpt = False,
) -> None:
    """Record checks in the ledger, then queue them (or, with no ITEM_BROKER_URL, run them here).

    Inputs are image files, http(s) URLs, or s3://bucket/key objects (read with the ITEM_S3_* settings).
    """
    from pipeline.core.errors import ItemError
    from worker.intake import client

    settings = settings_from()
    ids = external_id or inputs
    if len(ids) != len(inputs):
        raise fail(ValueError(f"{len(inputs)} inputs but {len(ids)} --external-id values."))
    try:
        items = [(eid, client.image_from(ref, by_path=by_path)) for eid, ref in zip(ids, inputs, strict=True)]
        if settings.broker_url:  # a service runs: file them for its workers
            submitted = client.submit(settings, items, callback_url=callback_url, tenant_id=tenant)
        else:  # embedded: the models load here, and the checks run before this command returns
            from worker.gpu.embedded import submit_in_process

            submitted = submit_in_process(settings, items, callback_url=callback_url, tenant_id=tenant)
    except ItemError as error:
        raise fail(error) from None
    for s in submitted:
        if as_json:
            print(json.dumps(asdict(s)))
        else:
            error = f"  {s.error_code}: {escape(s.error_message or '')}" if s.error_code and s.status != "done" else ""
            existing = "" if s.created else "  (exists)"
            out.print(f"{s.check_id}  {escape(s.external_id)}  {s.status}{existing}{error}", soft_wrap=True)
    unsuccessful = [s for s in submitted if s.status in ("rejected", "failed", "conflict")]
    if unsuccessful:
        ended = " or ".join(sorted({s.status for s in unsuccessful}))
        err.print(f"{len(unsuccessful)} of {len(submitted)} checks were {ended}")
        raise typer.Exit(1)


@app.command()
def status(
    check_ids: Annotated[list[str] | None, typer.Argument(help="Check ids; none: counts by status.")] = None,
    tenant: TenantOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """One line per check (status, verdict, error), or the number of checks in each status (of one tenant's checks
    with --tenant; another tenant's check is then not found)."""
    from worker.ledger.store import Ledger

    ledger = Ledger(settings_from().database_url)
    with ledger.session() as session:
        if not check_ids:
            counts = ledger.count_by_status(session, tenant_id=tenant)
            print(json.dumps(counts) if as_json else "  ".join(f"{k}={v}" for k, v in sorted(counts.items())))
            return
        rows = [ledger.get_check(session, check_id, tenant_id=tenant) for check_id in check_ids]
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
    tenant: TenantOpt = None,
    limit: Annotated[int, typer.Option(min=1, max=100_000)] = 100,
    as_json: JsonOpt = False,
) -> None:
    """Checks from the ledger, newest first, filtered. After a re-score, each version keeps its own result."""
    from worker.intake.client import checks

    rows = checks(
        settings_from(),
        status=status_,
        verdict=verdict,
        since=as_utc(since),
        until=as_utc(until),
        external_id=external_id,
        pipeline_version_id=version,
        tenant_id=tenant,
        limit=limit + 1,  # one more than shown tells whether the limit cut the list
    )
    _print_checks(rows[:limit], as_json)
    if len(rows) > limit:
        err.print(f"showing the newest {limit} matching checks; more match: narrow the filters or raise --limit")


def _print_checks(rows, as_json: bool) -> None:
    from worker.ledger.views import check_dict

    if as_json:
        for row in rows:
            print(json.dumps({**check_dict(row), "tenant": row.tenant_id}))
        return
    table = Table()
    for column in ("check", "tenant", "external id", "version", "status", "verdict", "p(fake)", "error"):
        table.add_column(column, overflow="fold")
    for row in rows:
        p_fake = "" if row.p_fake is None else f"{row.p_fake:.3f}"
        cells = (row.pipeline_version_id, row.status, row.verdict or "", p_fake, row.error_code or "")
        table.add_row(row.id, escape(row.tenant_id), escape(row.external_id), *cells)
    out.print(table)
