"""`item labels export`: moderators' decisions, as a CSV manifest and image files that `item train` reads.

The loop from the console back to the head: decisions made there (ai_generated, authentic) become labelled
images, to train or calibrate the next head on beside its original datasets. See `worker.labels`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from worker.cli.common import JsonOpt, TenantOpt, as_utc, err, fail, out, progress, settings_from

app = typer.Typer()
labels_app = typer.Typer(help="Moderators' decisions as training data for the head.", no_args_is_help=True)
app.add_typer(labels_app, name="labels")

FAILURES_SHOWN = 20


@labels_app.command("export")
def labels_export(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for labels.csv and images/ (made if missing; images are kept).")
    ],
    since: Annotated[
        datetime | None, typer.Option(help="Only checks whose latest decision is at or after (ISO time, UTC).")
    ] = None,
    tenant: TenantOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write the decided checks' images and a labels.csv (path,label,group,...) for `item train`.

    ai_generated is fake, authentic is real; unsure decisions are skipped. The latest decision of a check
    counts. Images are read from the ledger or again from their URL, path or S3 object: one that cannot be had
    is reported and left out (exit status 1). labels.csv is replaced as a whole, never half-written.
    """
    from pipeline.core.errors import ItemError
    from worker.labels import export_labels
    from worker.ledger.store import Ledger

    settings = settings_from()
    ledger = Ledger(settings.database_url)
    try:
        with progress("exporting labels") as bar:
            task = bar.add_task("labels", total=None)
            report = export_labels(
                settings,
                ledger,
                out_dir,
                since=as_utc(since),
                tenant_id=tenant,
                on_progress=lambda done, total: bar.update(task, completed=done, total=total),
            )
    except (ItemError, OSError) as error:
        raise fail(error) from None
    finally:
        ledger.dispose()
    if as_json:
        print(json.dumps(report.to_dict()))
    else:
        _print_report(report)
    if report.failures:
        raise typer.Exit(1)


def _print_report(report) -> None:
    manifest = escape(str(report.manifest))
    if report.exported:
        out.print(
            f"exported {report.exported} labels to {manifest}: {report.fake} fake, {report.real} real "
            f"(group moderators); {report.images_written} image files written",
            soft_wrap=True,
        )
    else:
        out.print(f"no labels to export; {manifest} lists none", soft_wrap=True)
    if report.unsure:
        out.print(f"skipped {report.unsure} checks decided unsure (not a label)")
    if report.conflicting_images:
        err.print(
            f"[yellow]{len(report.conflicting_images)} images are labelled real on one check and fake on another[/]: "
            f"{', '.join(report.conflicting_images[:5])}{' …' if len(report.conflicting_images) > 5 else ''}",
            soft_wrap=True,
        )
    if report.failures:
        table = Table(title=f"{report.failed} checks left out")
        for column in ("check", "external id", "error", "message"):
            table.add_column(column, overflow="fold")
        for failure in report.failures[:FAILURES_SHOWN]:
            table.add_row(failure.check_id, escape(failure.external_id), failure.code, escape(failure.message))
        err.print(table)
        if report.failed > FAILURES_SHOWN:
            err.print(f"… and {report.failed - FAILURES_SHOWN} more (--json lists them all)")
    if report.exported:
        out.print(
            f"next: item train {manifest} --out NEW_HEAD  (add the head's own datasets beside it to train on both)",
            soft_wrap=True,
        )
