"""`item versions` and `item rescore`: pipeline versions as records, and re-scoring after an upgrade.

A pipeline version is registered when a worker starts on a new head or profile (or by `item versions
register`), and becomes the active one: new checks and re-scores are made for it. `item versions activate`
switches back (a rollback). `item rescore` re-scores finished checks of older versions under the active one.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from worker.cli.common import JsonOpt, ModelDirOpt, ProfileOpt, as_utc, err, fail, out, settings_from

app = typer.Typer()
versions_app = typer.Typer(
    help="Pipeline versions: what changed stage by stage, and which one new checks use.", invoke_without_command=True
)
app.add_typer(versions_app, name="versions")

STAGES = ("caption", "ground", "embed", "head")


# ---------------------------------------------------------------------- item versions


@versions_app.callback()
def versions(ctx: typer.Context, as_json: JsonOpt = False) -> None:
    """List every pipeline version, oldest first, with what changed from the one before and its checks."""
    if ctx.invoked_subcommand is not None:
        return
    from worker.ledger.store import Ledger

    ledger = Ledger(settings_from().database_url)
    with ledger.session() as session:
        rows = ledger.versions(session)
        active = ledger.active_version(session)
        counts = ledger.checks_per_version(session)
    listed = [_version_dict(row, before, active, counts) for before, row in zip([None, *rows], rows, strict=False)]
    if as_json:
        for version in listed:
            print(json.dumps(version))
        return
    if not listed:
        err.print("no pipeline version is registered yet: start a worker, or run `item versions register`")
        return
    table = Table(title="pipeline versions (oldest first; * is active)")
    for column in ("", "version", "profile", "registered", "changed from the one before", "checks done/all"):
        table.add_column(column, overflow="fold")
    for version in listed:
        done, total = version["checks"].get("done", 0), sum(version["checks"].values())
        table.add_row(
            "*" if version["active"] else "",
            version["id"],
            version["profile"],
            version["created_at"][:19],
            escape(_changes_text(version["changed"])),
            f"{done}/{total}",
        )
    out.print(table)


def _version_dict(row, before, active, counts) -> dict:
    return {
        "id": row.id,
        "profile": row.profile,
        "active": active is not None and row.id == active.id,
        "created_at": row.created_at.isoformat(),
        "activated_at": row.activated_at.isoformat() if row.activated_at else None,
        "stages": {stage: getattr(row, stage) for stage in STAGES},
        "changed": stage_changes(before, row),
        "checks": counts.get(row.id, {}),
    }


def stage_changes(before, after) -> dict[str, list[str]] | None:
    """{stage: [from, to]} for each stage whose version differs (short forms); None for the first version."""
    if before is None:
        return None
    return {
        stage: [_short(getattr(before, stage)), _short(getattr(after, stage))]
        for stage in STAGES
        if getattr(before, stage) != getattr(after, stage)
    }


def _short(stage_version: str) -> str:
    """`caption:Salesforce/blip2-opt-2.7b@rev|params` → `Salesforce/blip2-opt-2.7b@rev` (the head: its hash)."""
    name = stage_version.split("|", 1)[0]
    return name.split(":", 1)[1] if ":" in name else name


def _changes_text(changed: dict | None) -> str:
    if changed is None:
        return "(first)"
    if not changed:
        return "(nothing)"
    return "; ".join(f"{stage}: {old} → {new}" for stage, (old, new) in changed.items())


@versions_app.command("register")
def versions_register(
    profile: ProfileOpt = None,
    head: Annotated[Path | None, typer.Option(help="Head .safetensors [env ITEM_HEAD].")] = None,
    model_dir: ModelDirOpt = None,
    activate: Annotated[bool, typer.Option(help="Make it the version new checks use.")] = True,
    as_json: JsonOpt = False,
) -> None:
    """Register the version that a profile and head make (no model is loaded), and by default activate it."""
    from pipeline.core.errors import ItemError
    from worker.gpu.build import build_detector
    from worker.ledger.store import Ledger

    settings = settings_from(profile=profile, head=head, model_dir=model_dir)
    try:
        detector = build_detector(settings)
    except (ItemError, ValueError) as error:
        raise fail(error) from None
    version = detector.pipeline_version
    ledger = Ledger(settings.database_url)
    with ledger.session() as session:
        created = ledger.ensure_pipeline_version(session, version, detector.profile.name, activate=activate)
        if activate and not created:
            ledger.activate_version(session, version.id)
    result = {"id": version.id, "profile": detector.profile.name, "registered": created, "active": activate}
    if as_json:
        print(json.dumps(result))
        return
    state = "registered" if created else "already registered"
    out.print(f"{version.id} {state}{', active' if activate else ''}")


@versions_app.command("activate")
def versions_activate(version_id: Annotated[str, typer.Argument(help="A version id, pv-….")]) -> None:
    """Make a registered version the one new checks (and re-scores) are made for: a rollback, say."""
    from pipeline.core.errors import ItemError
    from worker.ledger.store import Ledger

    ledger = Ledger(settings_from().database_url)
    with ledger.session() as session:
        row = ledger.activate_version(session, version_id)
    if row is None:
        raise fail(ItemError(f"No pipeline version {version_id}: see `item versions`.", code="version.unknown"))
    out.print(f"{version_id} is active: new checks and re-scores use it; its workers must be running")


# ---------------------------------------------------------------------- item rescore


@app.command()
def rescore(
    from_version: Annotated[str | None, typer.Option(help="Only checks scored under this version.")] = None,
    since: Annotated[datetime | None, typer.Option(help="Checks created at or after (ISO time, UTC).")] = None,
    until: Annotated[datetime | None, typer.Option(help="Checks created before (ISO time, UTC).")] = None,
    verdict: Annotated[str | None, typer.Option(help="Only checks with this verdict: real or fake.")] = None,
    min_score: Annotated[float | None, typer.Option(min=0, max=1, help="Only p(fake) at or above.")] = None,
    max_score: Annotated[float | None, typer.Option(min=0, max=1, help="Only p(fake) at or below.")] = None,
    ids_file: Annotated[
        Path | None, typer.Option(help="Only these external ids: a text file, one per line.", exists=True)
    ] = None,
    limit: Annotated[int | None, typer.Option(min=1, help="At most this many checks.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the workers and report the outcome.")] = True,
    timeout: Annotated[float | None, typer.Option(min=0, help="Stop waiting after this many seconds.")] = None,
    dry_run: Annotated[bool, typer.Option(help="Only count what would be re-scored.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Re-score finished checks of older pipeline versions under the active one, on the low-priority queue.

    Stored artifacts whose stage did not change are reused: after a head-only upgrade only the head runs. A
    rerun skips what is done and re-sends what is still queued. Old results stay readable under their version.
    Without ITEM_BROKER_URL the re-scores run here, under the version ITEM_PROFILE and ITEM_HEAD describe.
    """
    from pipeline.core.errors import ItemError
    from worker.ledger.store import RescoreSelection

    if verdict not in (None, "real", "fake"):
        raise fail(ValueError(f"--verdict must be real or fake, not {verdict!r}"))
    selection = RescoreSelection(
        from_version=from_version,
        since=as_utc(since),
        until=as_utc(until),
        verdict=verdict,
        min_score=min_score,
        max_score=max_score,
        external_ids=_read_ids(ids_file) if ids_file else None,
    )
    try:
        _rescore(selection, limit=limit, wait=wait, timeout=timeout, dry_run=dry_run, as_json=as_json)
    except ItemError as error:
        raise fail(error) from None


def _read_ids(path: Path) -> tuple[str, ...]:
    lines = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def _rescore(selection, *, limit, wait, timeout, dry_run, as_json) -> None:
    from worker import rescore as rescoring
    from worker.ledger.store import Ledger

    settings = settings_from()
    embedded = None
    if not settings.broker_url and not dry_run:
        embedded = _embedded(settings)
    ledger = Ledger(settings.database_url)
    version_id = rescoring.target_version(ledger)
    if dry_run:
        count = rescoring.count(ledger, selection, version_id=version_id, limit=limit)
        _report({"version": version_id, "selected": count, "dry_run": True}, as_json)
        return
    with _RescoreProgress(as_json) as progress:

        def on_page(run, waiting: list[str]) -> None:
            if embedded:  # each page runs here, now: then read how it ended
                embedded.finish(waiting)
                rescoring.refresh(ledger, run)
            progress.update(run)

        run = rescoring.queue(ledger, selection, version_id=version_id, limit=limit, on_page=on_page)
        complete = True
        if wait and not embedded:
            complete = rescoring.watch(ledger, run, timeout_s=timeout, on_progress=progress.update)
    _report(_summary(ledger, run, complete, waited=wait or bool(embedded)), as_json)


def _embedded(settings):
    """No broker: the re-scores run in this process, under the version the settings describe, made active."""
    from worker.gpu.embedded import InProcess

    runner = InProcess(settings)
    ledger = runner.service.ledger
    with ledger.session() as session:
        active = ledger.active_version(session)
    if active is None or active.id != runner.service.version_id:
        from pipeline.core.errors import ItemError

        raise ItemError(
            f"The active version is {active.id if active else 'none'}, but ITEM_PROFILE/ITEM_HEAD describe "
            f"{runner.service.version_id}: `item versions activate {runner.service.version_id}` first.",
            code="version.not_active",
        )
    return runner


def _summary(ledger, run, complete: bool, waited: bool) -> dict:
    from worker import rescore as rescoring

    flips = rescoring.flips(ledger, run)
    return {
        "version": run.version_id,
        "selected": run.selected,
        "created": run.created,
        "queued": run.queued,
        "already_done": run.already_done,
        "statuses": run.counts(),
        "complete": complete and not run.pending,
        "waited": waited,
        "seconds": round(time.monotonic() - run.started, 3),
        "rate_per_s": round(rescoring.rate(run), 2),
        "flipped": flips.total,
        "flipped_to_fake": flips.to_fake,
        "flipped_to_real": flips.to_real,
        "flipped_to_uncertain": flips.to_uncertain,
        "compared": flips.compared,
    }


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    if summary.get("dry_run"):
        out.print(f"would re-score {summary['selected']} checks under {summary['version']}")
        return
    statuses = summary["statuses"]
    if not summary["selected"]:
        out.print(f"nothing to re-score: no finished check of another version than {summary['version']} matches")
        return
    out.print(
        f"re-scored under {summary['version']}: {summary['selected']} selected, {summary['created']} new, "
        f"{summary['already_done']} already done, {summary['queued']} waiting for a worker"
    )
    if not summary["waited"]:
        out.print("not waiting: `item rescore` again (it skips what is done) or `item status` shows progress")
        return
    out.print(
        f"done {statuses['done']}, rejected {statuses['rejected']}, failed {statuses['failed']}, "
        f"unfinished {statuses['queued'] + statuses['running']} · {summary['rate_per_s']:.1f} checks/s"
    )
    out.print(
        f"verdicts flipped: {summary['flipped']} of {summary['compared']} "
        f"({summary['flipped_to_fake']} to fake, {summary['flipped_to_real']} to real, "
        f"{summary['flipped_to_uncertain']} to uncertain)"
    )


class _RescoreProgress:
    """done / total, rate and ETA: a bar on a terminal, a line every few seconds in a log."""

    LOG_EVERY_S = 5.0

    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.bar = Progress(
            TextColumn("re-scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TimeRemainingColumn(),
            console=err,
            disable=not err.is_terminal,
            transient=True,
        )
        self.task = None
        self.last_line = time.monotonic()  # the first line comes after LOG_EVERY_S: short runs print none

    def __enter__(self):
        self.bar.__enter__()
        self.task = self.bar.add_task("rescore", total=None, rate="")
        return self

    def __exit__(self, *exc) -> None:
        self.bar.__exit__(*exc)

    def update(self, run) -> None:
        from worker import rescore as rescoring

        rate = rescoring.rate(run)
        self.bar.update(self.task, total=run.total, completed=run.finished, rate=f"{rate:.1f}/s")
        if err.is_terminal or self.quiet or time.monotonic() - self.last_line < self.LOG_EVERY_S:
            return
        self.last_line = time.monotonic()
        left = run.total - run.finished
        eta = f"{left / rate:.0f}s" if rate > 0 else "?"
        err.print(f"re-scoring: {run.finished}/{run.total} done, {rate:.1f}/s, ETA {eta}", soft_wrap=True)
