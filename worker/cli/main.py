"""The `item` command line: one Typer app assembled from the command groups, each a module of this package.

Commands parse options, call plain functions and render the results; model libraries are imported inside the
commands that need them, so `item --help`, `item status` and the other client commands start at once.
"""

from __future__ import annotations

import logging
import os

import typer

from worker.cli import (
    backlog,
    broker_access,
    callback_secrets,
    checks,
    deliveries,
    experiments,
    labels,
    operations,
    tenants,
    versions,
    web,
)

app = typer.Typer(help="ITEM: detect AI-generated images by image-text misalignment.", no_args_is_help=True)
for group in (checks, experiments, versions, deliveries, operations, backlog, web, labels, tenants,
              callback_secrets, broker_access):  # fmt: skip
    app.add_typer(group.app)


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
