"""The audit trail outlives the ledger: a day of checks is written to a file before its partition goes.

One file per UTC day, `checks-YYYY-MM-DD.jsonl.gz` in ITEM_ARCHIVE_DIR: gzip-compressed JSON Lines, a check
per line as platforms read it everywhere else (`views.check_dict`, the JSON of `item status --json`) with its
`tenant`, so
`zcat checks-*.jsonl.gz | jq` and any tool reading `item labels export` files read it. The file is written
beside its final name and renamed once complete and on disk, so a run killed halfway leaves no partial
archive under that name, and a run repeated after a failed drop writes the same file again.
"""

from __future__ import annotations

import gzip
import json
import os
from datetime import date, timedelta
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.orm import Session

from worker.ledger.models import CheckRow
from worker.ledger.partitions import day_start
from worker.ledger.views import check_dict

READ_PAGE = 2_000  # rows fetched at a time from a server-side cursor: a day of checks never sits in memory


def made_on(day: date) -> list[sa.ColumnElement[bool]]:
    """The checks made on `day` (UTC): on PostgreSQL exactly one partition."""
    return [CheckRow.created_at >= day_start(day), CheckRow.created_at < day_start(day + timedelta(days=1))]


def archive_path(folder: Path, day: date) -> Path:
    return folder / f"checks-{day.isoformat()}.jsonl.gz"


def export_day(engine: sa.Engine, folder: Path, day: date) -> Path:
    """Writes every check made on `day` to its archive file; returns the file's path."""
    folder.mkdir(parents=True, exist_ok=True)
    final = archive_path(folder, day)
    partial = final.with_name(final.name + ".partial")
    query = sa.select(CheckRow).where(*made_on(day)).order_by(CheckRow.created_at, CheckRow.id)
    with Session(engine) as session, partial.open("wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as compressed:
            for row in session.scalars(query.execution_options(yield_per=READ_PAGE)):
                record = {**check_dict(row), "tenant": row.tenant_id}
                compressed.write(json.dumps(record, ensure_ascii=False).encode() + b"\n")
        raw.flush()
        os.fsync(raw.fileno())
    partial.replace(final)
    return final


def read_archive(path: Path):
    """The checks of an archive file, one dict at a time."""
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)
