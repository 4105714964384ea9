"""What the ledger keeps per image, by sha256: decoded images, inline bytes (blobs), reusable artifacts, and
the finished check that answers duplicates of the same bytes.

The same bytes under the same stage versions always give the same results, so all of it is written once
(INSERT ... ON CONFLICT DO NOTHING) and never updated, and a worker's batch reads and writes it a batch at a time.

"Once" per UTC day: these rows carry the day they were stored (`stored_today`, midnight UTC) in `created_at`,
which is in their key because PostgreSQL partitions them by it. Bytes stored again on a later day get a copy in
that day's partition, so what keeps arriving outlives the retention of its first copy; readers take any copy.
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.orm import Session, aliased

from pipeline.core import codec
from pipeline.core.results import Artifacts
from worker.ledger.models import ArtifactRow, BlobRow, CheckRow, ImageRow
from worker.ledger.partitions import day_start, today
from worker.ledger.queries import fresh, in_chunks, insert_many
from worker.ledger.states import CheckStatus

if TYPE_CHECKING:  # decoding imports Pillow and numpy: the client side reads the ledger without them
    from pipeline.core.imaging import DecodedImage


def upsert_images(session: Session, images: list[DecodedImage], media: dict[str, dict] | None = None) -> None:
    """Records decoded images once each, in one statement; the same bytes always decode the same, so nothing
    is ever updated. `media`: by sha256, what was sampled of a video or animation (its frames' keys)."""
    now = stored_today()
    media = media or {}
    rows = {
        image.sha256: {
            "sha256": image.sha256,
            "n_bytes": image.n_bytes,
            "width": image.width,
            "height": image.height,
            "format": image.format,
            "media": media.get(image.sha256),
            "pdq": image.pdq,
            "pdq_quality": image.pdq_quality,
            "created_at": now,
        }
        for image in images
    }
    insert_many(session, ImageRow, list(rows.values()))


def image_facts(session: Session, sha256s: list[str]) -> dict[str, tuple[dict | None, bytes | None, int | None]]:
    """(media listing, PDQ hash, its quality) of each of these images the ledger holds, by sha256: what a re-score
    needs to find a video's frames, and the bank an image's hash, without the bytes. Any copy serves (see the note
    on days)."""
    found = {}
    columns = (ImageRow.sha256, ImageRow.media, ImageRow.pdq, ImageRow.pdq_quality)
    for chunk in in_chunks(sorted(set(sha256s))):
        query = sa.select(*columns).where(ImageRow.sha256.in_(chunk))
        found.update({sha: (media, pdq, quality) for sha, media, pdq, quality in session.execute(query)})
    return found


def get_image(session: Session, sha256: str) -> ImageRow | None:
    """What was decoded of these bytes (its latest copy: see the module's note on days)."""
    query = sa.select(ImageRow).where(ImageRow.sha256 == sha256).order_by(ImageRow.created_at.desc()).limit(1)
    return session.scalars(query).first()


def stored_today() -> datetime:
    """The `created_at` of content stored now: the start of today (UTC), so a second store the same day is the
    same key and is skipped."""
    return day_start(today())


def put_blob(session: Session, sha256: str, data: bytes) -> None:
    put_blobs(session, {sha256: data})


def put_blobs(session: Session, blobs: dict[str, bytes]) -> None:
    """Stores inline images by sha256, in one statement per IN_CHUNK of them; one already stored is kept."""
    today = stored_today()
    rows = [{"sha256": sha256, "data": data, "created_at": today} for sha256, data in blobs.items()]
    insert_many(session, BlobRow, rows)


def get_blobs(session: Session, sha256s: list[str]) -> dict[str, bytes]:
    """The stored bytes of each of these blobs that exists, by sha256."""
    found = {}
    for chunk in in_chunks(sorted(set(sha256s))):
        query = sa.select(BlobRow.sha256, BlobRow.data).where(BlobRow.sha256.in_(chunk))
        found.update({sha256: data for sha256, data in session.execute(query)})
    return found


def load_artifacts(session: Session, sha256s: list[str], versions: dict[str, str]) -> dict[str, Artifacts]:
    """For every sha256, the artifacts stored under exactly these version keys (kinds not stored stay None)."""
    found = {sha256: Artifacts() for sha256 in sha256s}
    wanted = {(kind, codec.version_hash(version)): version for kind, version in versions.items()}
    if not found or not wanted:
        return found
    key_match = sa.or_(*(sa.and_(ArtifactRow.kind == k, ArtifactRow.version_hash == h) for k, h in wanted))
    for chunk in in_chunks(list(found)):
        query = sa.select(ArtifactRow).where(ArtifactRow.sha256.in_(chunk), key_match)
        for row in session.scalars(query):
            if row.version == wanted[(row.kind, row.version_hash)]:  # a hash-prefix collision is not a match
                codec.set_field(found[row.sha256], row.kind, codec.decode(row.kind, row.payload, row.vectors))
    return found


def save_artifacts(session: Session, sha256: str, artifacts: Artifacts, versions: dict[str, str]) -> None:
    """Stores each artifact present under its version key; one already stored is left as it is."""
    save_artifacts_many(session, {sha256: (artifacts, versions)})


def save_artifacts_many(session: Session, items: dict[str, tuple[Artifacts, dict[str, str]]]) -> None:
    """`save_artifacts` for many images, {sha256: (artifacts, version keys to store)}, in one statement."""
    now, rows = stored_today(), []
    for sha256, (artifacts, versions) in items.items():
        for kind, version in versions.items():
            value = codec.get_field(artifacts, kind)
            if value is None:
                continue
            payload, vectors = codec.encode(kind, value)
            key = {"sha256": sha256, "kind": kind, "version_hash": codec.version_hash(version)}
            rows.append({**key, "version": version, "payload": payload, "vectors": vectors, "created_at": now})
    insert_many(session, ArtifactRow, rows)


def done_checks_for_images(session: Session, sha256s: list[str], pipeline_version_id: str) -> dict[str, CheckRow]:
    """The first finished check of each of these bytes under this version: its answer serves duplicates.

    One row read per image, however often its bytes were checked before: for each sha256, the first entry of its
    range in `ix_checks_done_by_image` (a correlated LIMIT 1 the index answers in order), then that check by
    its key. One query per 500 images (IN_CHUNK): a batch of re-scores asks for 64 at once.
    """
    first = {}
    for chunk in in_chunks(sorted(set(sha256s))):
        query = sa.select(CheckRow).where(CheckRow.id.in_(_first_done_ids(session, chunk, pipeline_version_id)))
        first.update({row.image_sha256: row for row in session.scalars(fresh(query))})
    return first


def _first_done_ids(session: Session, sha256s: list[str], pipeline_version_id: str) -> sa.Select:
    """The id of each image's first done check under the version, over the list of sha256s given as one array or
    JSON parameter (a statement compiled once whatever the list's length): on PostgreSQL a LATERAL ... LIMIT 1 per
    sha256, on SQLite (no LATERAL) the same as a correlated subquery."""
    earlier = aliased(CheckRow)  # not the outer query's checks
    first = (
        sa.select(earlier.id)
        .where(
            earlier.pipeline_version_id == pipeline_version_id,
            earlier.status == sa.literal(CheckStatus.done.value, literal_execute=True),  # the index's WHERE
        )
        .order_by(earlier.finished_at, earlier.id)
        .limit(1)
    )
    if session.get_bind().dialect.name == "postgresql":
        listed = sa.func.unnest(sa.bindparam("sha256s", sha256s, sa.ARRAY(sa.String)))
        wanted = listed.table_valued("sha256").render_derived(name="wanted")  # unnest(...) AS wanted(sha256)
        found = first.where(earlier.image_sha256 == wanted.c.sha256).lateral("found")
        return sa.select(found.c.id).select_from(wanted).join(found, sa.true())
    wanted = sa.func.json_each(sa.bindparam("sha256s", sha256s, sa.JSON)).table_valued("value")
    found = first.where(earlier.image_sha256 == wanted.c.value).correlate(wanted).scalar_subquery()
    return sa.select(found).select_from(wanted)
