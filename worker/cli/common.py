"""What every `item` command shares: the consoles, the common options, settings, progress bars, the error exit.

Exit status: 0 all good; 1 some input failed (each failure is in its row); 2 nothing could run (bad option,
bad setting, unknown profile, missing model, unusable head).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from worker.settings import Settings, SettingsError, load_settings

out = Console()
err = Console(stderr=True)

PROFILE_HELP = "Model profile: paper, small, tiny, or another of `item models list`."
ProfileOpt = Annotated[str | None, typer.Option("--profile", "-p", help=PROFILE_HELP)]
ModelDirOpt = Annotated[Path | None, typer.Option("--model-dir", help="Model folder [env ITEM_MODEL_DIR].")]
OfflineOpt = Annotated[bool, typer.Option("--offline", help="Never download; missing models are an error.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line on stdout.")]
# The command line reads the ledger itself, as an operator: every tenant's rows unless narrowed to one.
TenantOpt = Annotated[str | None, typer.Option("--tenant", help="Only this tenant's (default: every tenant's).")]


def settings_from(**overrides) -> Settings:
    """This command's settings: the environment's, with the options it was given (None: not given)."""
    try:
        return load_settings(**overrides)
    except SettingsError as error:
        raise fail(error) from None


def fail(error: Exception) -> typer.Exit:
    """Prints `[code] message` and returns the exit (status 2) for the caller to raise."""
    code = getattr(error, "code", type(error).__name__)
    # One line, however long: a log collector (a container's, a CI's) reads each line as its own record.
    err.print(f"[bold red]error[/] {escape(f'[{code}]')} {escape(str(error))}", soft_wrap=True)
    return typer.Exit(2)


def progress(label: str) -> Progress:
    """A progress bar with an ETA on stderr, shown only on a terminal."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not err.is_terminal,
        transient=True,
    )


def model_store(settings: Settings, offline: bool):
    from pipeline.core.model_store import ModelStore

    return ModelStore(settings.model_dir, allow_download=settings.allow_download and not offline)


def profile_named(name: str):
    from pipeline.core.errors import ItemError
    from pipeline.core.profiles import get_profile

    try:
        return get_profile(name)
    except ItemError as error:
        raise fail(error) from None


def as_utc(moment: datetime | None) -> datetime | None:
    """An option's time in UTC: a time given without a zone is taken as UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def require_migrated(database_url: str) -> str:
    """The URL of a ledger at this code's schema; else exit 2 saying what to run (not an SQL traceback)."""
    from worker.ledger import migrate

    try:
        current = migrate.is_up_to_date(database_url)
    except Exception as error:  # unreachable, or not a database: said in one line
        raise fail(error) from None
    if not current:
        raise fail(RuntimeError("The ledger's schema is not this code's: run `item db upgrade` first."))
    return database_url


def in_ledger(work, database_url: str | None = None):
    """`work(session)` in one transaction of the migrated ledger (ITEM_DATABASE_URL unless given); a typed error
    exits 2 with its code."""
    from pipeline.core.errors import ItemError
    from worker.ledger.store import Ledger

    ledger = Ledger(require_migrated(database_url or settings_from().database_url))
    try:
        with ledger.session() as session:
            return work(session)
    except ItemError as error:
        raise fail(error) from None
    finally:
        ledger.dispose()
