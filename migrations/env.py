"""Alembic's entry point: migrates the database named by `sqlalchemy.url` (set by `worker.ledger.migrate`).

SQLite cannot ALTER most things, so there migrations run in batch mode (copy the table, swap it in).
Online mode only: the ledger is always migrated against a live database.
"""

from __future__ import annotations

from alembic import context

from worker.ledger.migrate import make_migration_engine
from worker.ledger.models import Base
from worker.ledger.partitions import is_partition_name

target_metadata = Base.metadata


def include_name(name: str | None, type_: str, _parents: dict) -> bool:
    """A day's partition is no table of the models: they describe its parent."""
    return not (type_ == "table" and name is not None and is_partition_name(name))


def run_migrations_online() -> None:
    engine = make_migration_engine(context.config.get_main_option("sqlalchemy.url"))
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                render_as_batch=connection.dialect.name == "sqlite",
                compare_type=True,
                include_name=include_name,
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise RuntimeError("The ledger is migrated online only (worker.ledger.migrate / `item db upgrade`).")
run_migrations_online()
