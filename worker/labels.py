"""`item labels export`: moderators' decisions as a training set for the head.

Each decided check's latest decision (a later one overrides an earlier one) becomes a row of a CSV manifest
that `item train` and `item calibrate` read as they are: `ai_generated` is `fake`, `authentic` is `real`, and
`unsure` is no label at all (skipped, and counted). Every image's original bytes are written beside it, named
by their sha256, so identical uploads are one file and a second export into the same folder rewrites nothing.

The bytes come from the ledger's blob of an inline upload, or are read again from the check's URL, path or S3
object, through `worker.sources.kinds` and so with every check a worker makes (private addresses refused, size and
time limits). A check whose bytes cannot be had is reported with its error code and left out; so is one whose
source now serves other bytes than the ones scored and decided on. None of that stops the export.

The manifest is written to a temporary file and renamed into place, and so is every image: a reader never sees
a half-written one. The manifest lists exactly this export's rows (with `since`, only the newer decisions).
"""

from __future__ import annotations

import csv
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import IO, TYPE_CHECKING

from pipeline.core.errors import ItemError
from pipeline.core.imaging import FILE_EXTENSIONS, check_size, sniff_format
from worker.settings import Settings
from worker.sources import kinds as sources

if TYPE_CHECKING:
    from worker.ledger.store import Ledger

MANIFEST = "labels.csv"
IMAGE_FOLDER = "images"
GROUP = "moderators"
LABEL_OF = {"ai_generated": "fake", "authentic": "real"}  # "unsure" is no label
COLUMNS = (
    "path",
    "label",
    "group",
    "check_id",
    "external_id",
    "image_sha256",
    "reviewer",
    "decided_at",
    "p_fake",
    "pipeline_version_id",
    "tenant",
)
CHUNK = 64  # checks whose bytes are read (and blobs held in memory) at once


@dataclass(frozen=True)
class ExportFailure:
    """A decided check left out of the manifest, and why."""

    check_id: str
    external_id: str
    code: str
    message: str


@dataclass
class ExportReport:
    manifest: Path
    real: int = 0
    fake: int = 0
    unsure: int = 0  # latest decisions that were "unsure": not labels, skipped
    images_written: int = 0  # image files this export wrote; identical bytes, or ones already there, are not
    failures: list[ExportFailure] = field(default_factory=list)
    conflicting_images: list[str] = field(default_factory=list)  # sha256s labelled real on one check, fake on another

    @property
    def exported(self) -> int:
        return self.real + self.fake

    @property
    def failed(self) -> int:
        return len(self.failures)

    def to_dict(self) -> dict:
        return {
            "manifest": str(self.manifest),
            "exported": self.exported,
            "real": self.real,
            "fake": self.fake,
            "unsure": self.unsure,
            "failed": self.failed,
            "images_written": self.images_written,
            "conflicting_images": list(self.conflicting_images),
            "failures": [asdict(failure) for failure in self.failures],
        }


@dataclass(frozen=True)
class _Decided:
    """What the export needs of a check and its latest decision, read in one transaction."""

    check_id: str
    external_id: str
    tenant_id: str
    source: dict
    image_sha256: str | None  # of the bytes that were scored; None if the check never decoded an image
    p_fake: float | None
    pipeline_version_id: str
    label: str  # "real" | "fake"
    reviewer: str
    decided_at: datetime


class _Refused(ItemError):
    code = "labels.unusable"


def export_labels(
    settings: Settings,
    ledger: Ledger,
    out_dir: Path,
    *,
    since: datetime | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    tenant_id: str | None = None,
) -> ExportReport:
    """Writes `out_dir/labels.csv` and `out_dir/images/`; `on_progress(done, total)` after each decided check.

    `since`: only checks whose latest decision was made at or after it (a timezone-aware time). `tenant_id`: only
    that tenant's checks (None: every tenant's; each row names its tenant).
    """
    out_dir = Path(out_dir)
    image_dir = out_dir / IMAGE_FOLDER
    image_dir.mkdir(parents=True, exist_ok=True)
    report = ExportReport(manifest=out_dir / MANIFEST)
    decided, report.unsure = _decided(ledger, since, tenant_id)
    rows: list[dict] = []
    labels_of_image: dict[str, set[str]] = {}
    written: set[str] = set()
    with ThreadPoolExecutor(max(1, min(settings.fetch_concurrency, CHUNK)), thread_name_prefix="item-labels") as pool:
        for done, (one, data) in enumerate(_read_all(ledger, settings, decided, pool), start=1):
            try:
                sha, extension = _checked(one, data, settings)
            except ItemError as error:
                report.failures.append(ExportFailure(one.check_id, one.external_id, error.code, error.message))
            else:
                name = f"{sha}.{extension}"
                if sha not in written:
                    report.images_written += _write_image(image_dir / name, data)
                    written.add(sha)
                rows.append(_row(one, f"{IMAGE_FOLDER}/{name}", sha))
                labels_of_image.setdefault(sha, set()).add(one.label)
                if one.label == "fake":
                    report.fake += 1
                else:
                    report.real += 1
            if on_progress is not None:
                on_progress(done, len(decided))
    _write_manifest(report.manifest, rows)
    report.conflicting_images = sorted(sha for sha, labels in labels_of_image.items() if len(labels) > 1)
    return report


def _decided(ledger: Ledger, since: datetime | None, tenant_id: str | None) -> tuple[list[_Decided], int]:
    """The labelled checks, oldest decision first, and how many latest decisions were "unsure"."""
    from worker.ledger.reviews import latest_decisions

    decided, unsure = [], 0
    with ledger.session() as session:
        for decision, check in latest_decisions(session, since=since, tenant_id=tenant_id):
            label = LABEL_OF.get(decision.label)
            if label is None:
                unsure += 1
                continue
            decided.append(
                _Decided(
                    check_id=check.id,
                    external_id=check.external_id,
                    tenant_id=check.tenant_id,
                    source=dict(check.source or {}),
                    image_sha256=check.image_sha256,
                    p_fake=check.p_fake,
                    pipeline_version_id=check.pipeline_version_id,
                    label=label,
                    reviewer=decision.reviewer,
                    decided_at=decision.decided_at,
                )
            )
    return decided, unsure


def _read_all(
    ledger: Ledger, settings: Settings, decided: list[_Decided], pool: ThreadPoolExecutor
) -> Iterator[tuple[_Decided, bytes | ItemError]]:
    """Each check with its bytes, or the error that kept them, in order: a chunk at a time, each chunk's blobs
    read in one short transaction and its downloads run on the pool (no transaction stays open meanwhile)."""
    for start in range(0, len(decided), CHUNK):
        chunk = decided[start : start + CHUNK]
        names = sorted({one.source["blob"] for one in chunk if isinstance(one.source.get("blob"), str)})
        blobs: dict[str, bytes] = {}
        if names:
            with ledger.session() as session:
                blobs = ledger.get_blobs(session, names)
        yield from zip(chunk, pool.map(partial(_load, settings=settings, blobs=blobs), chunk), strict=True)


def _load(one: _Decided, settings: Settings, blobs: dict[str, bytes]) -> bytes | ItemError:
    try:
        return sources.load(one.source, settings, blobs.get, timeout_s=settings.fetch_timeout_s)
    except ItemError as error:
        return error
    except Exception as error:  # one source's unforeseen failure must not end the export of the others
        return _Refused(f"The image could not be read: {type(error).__name__}: {error}", code="labels.unreadable")


def _checked(one: _Decided, data: bytes | ItemError, settings: Settings) -> tuple[str, str]:
    """The bytes' sha256 and file extension, or the reason they cannot stand for the decided image."""
    if isinstance(data, ItemError):
        raise data
    check_size(data, settings.max_image_bytes)
    sha = hashlib.sha256(data).hexdigest()
    if one.image_sha256 and sha != one.image_sha256:
        raise _Refused(
            f"The source now holds other bytes (sha256 {sha}) than the image scored and decided on "
            f"({one.image_sha256}): the decision is not theirs.",
            code="labels.image_changed",
        )
    return sha, FILE_EXTENSIONS[sniff_format(data)]


def _row(one: _Decided, path: str, sha: str) -> dict:
    return {
        "path": path,
        "label": one.label,
        "group": GROUP,
        "check_id": one.check_id,
        "external_id": spreadsheet_safe(one.external_id),
        "image_sha256": sha,
        "reviewer": spreadsheet_safe(one.reviewer),
        "decided_at": one.decided_at.isoformat(),
        "p_fake": "" if one.p_fake is None else repr(one.p_fake),
        "pipeline_version_id": one.pipeline_version_id,
        "tenant": one.tenant_id,
    }


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets run as a formula at a cell's start


def spreadsheet_safe(text: str) -> str:
    """`text` as a cell a spreadsheet shows rather than runs: a platform's id or a key's name that starts like a
    formula (`=HYPERLINK(...)`) gets a leading apostrophe, OWASP's advice against CSV injection."""
    return f"'{text}" if text.startswith(FORMULA_STARTS) else text


def _write_image(path: Path, data: bytes) -> int:
    """1 if the file was written, 0 if it was there already (its name is its bytes' hash)."""
    if path.is_file() and path.stat().st_size == len(data):
        return 0
    with _replacing(path) as handle:
        handle.write(data)
    return 1


def _write_manifest(path: Path, rows: list[dict]) -> None:
    with _replacing(path, text=True) as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


@contextmanager
def _replacing(path: Path, *, text: bool = False) -> Iterator[IO]:
    """A file opened under a hidden temporary name beside `path` (with the permissions of any new file: the
    umask's), renamed onto it once fully written and flushed to disk; removed instead if writing fails."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        options = {"mode": "w", "encoding": "utf-8", "newline": ""} if text else {"mode": "wb"}
        with os.fdopen(descriptor, **options) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
