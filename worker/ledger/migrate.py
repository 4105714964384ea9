"""Schema migrations, run from code: no alembic.ini, the scripts ship inside the `migrations` package.

`item db upgrade` and the tests call these; the worker refuses to start on a ledger that is not at head.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

import migrations
from worker.ledger.engine import make_engine, normalize_url

# `__path__`, not `__file__`: an editable install made before `migrations/__init__.py` existed maps the folder as
# a namespace package, which has no `__file__`.
SCRIPT_LOCATION = Path(next(iter(migrations.__path__)))


def config(url: str) -> Config:
    """Alembic's configuration for the ledger at `url` (`env.py` reads the URL back from it)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPT_LOCATION))
    # configparser interpolates '%': a URL-encoded password (%40...) must be escaped.
    cfg.set_main_option("sqlalchemy.url", normalize_url(url).render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    command.upgrade(config(url), revision)


def downgrade(url: str, revision: str) -> None:
    command.downgrade(config(url), revision)


def current(url: str) -> str | None:
    """The revision the database is at; None for an empty (never migrated, or downgraded to base) database."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not _sqlite_file_exists(parsed.database):
        return None  # asking must not create the file
    engine = make_engine(url, foreign_keys=False)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def _sqlite_file_exists(database: str) -> bool:
    return database == ":memory:" or database.startswith("file:") or Path(database).expanduser().exists()


def head() -> str | None:
    """The newest revision the code ships."""
    return ScriptDirectory.from_config(config("sqlite://")).get_current_head()


def is_up_to_date(url: str) -> bool:
    """Whether the database is at the newest revision (a worker should not serve an older schema)."""
    return current(url) == head()


def make_migration_engine(url: str | sa.URL) -> sa.Engine:
    """What `env.py` migrates with: the ledger's engine setup, minus SQLite foreign-key enforcement."""
    return make_engine(url, foreign_keys=False)
