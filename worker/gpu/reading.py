"""What reading a batch's images leaves besides the pixels: the checks that leave the batch because their bytes
are late (deferred, see `worker.sources.downloads`), and the thumbnails kept for the console."""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

from sqlalchemy.orm import Session

from pipeline.core.imaging import DecodedImage, thumbnail_jpeg
from worker.ledger.engine import INFRASTRUCTURE_ERRORS
from worker.ledger.models import CheckRow, utcnow
from worker.ledger.reviews import Thumbnail
from worker.ledger.store import Lease, Ledger
from worker.ops import metrics
from worker.settings import Settings
from worker.sources import kinds as sources
from worker.sources.downloads import Deferred, Downloads

log = logging.getLogger("item.worker")
SLOW_CODES = ("url.timeout", "check.timeout", "s3.unavailable")  # a check retried for these waits for no download


def downloads_for(settings: Settings) -> Downloads:
    """A process's background downloads under `settings`: each within ITEM_FETCH_TIMEOUT_S, ITEM_FETCH_CONCURRENCY
    at once, ITEM_FETCH_PER_HOST from one host."""
    return Downloads(
        lambda source: sources.load(source, settings, lambda _: None),
        concurrency=settings.fetch_concurrency,
        per_host=settings.fetch_per_host,
        timeout_s=settings.fetch_timeout_s,
        first_delay_s=settings.batch_read_wait_s,
        max_bytes=4 * sources.upload_limit(settings),
    )


LEDGER_TRIES = 4  # of one batch transaction whose connection broke: the pool reconnects between tries
T = TypeVar("T")


def in_transaction(ledger: Ledger, batch, work: Callable[[Session], T]) -> T:
    """`work` in one ledger transaction of `batch`. A connection that broke (the database restarted, the connection
    was cut) is tried again on a fresh one, a few times while the batch has time left: the transaction was rolled
    back, so repeating it is safe, and a batch is not lost (an attempt burnt) to one dropped link."""
    tries = 0
    while True:
        try:
            with ledger.session(batch.tally) as session:
                return work(session)
        except INFRASTRUCTURE_ERRORS:
            tries += 1
            if tries == LEDGER_TRIES or batch.left_s() <= 0:
                raise
            log.info("ledger transaction of a batch of %d checks broke; trying again", len(batch.checks))
            time.sleep(0.05 * 2**tries)


def frame_rule(settings: Settings):
    """How animated images and videos are sampled under `settings` (`pipeline.core.media.FrameRule`); None: as before
    (an animation judged by its first frame, a video refused)."""
    if settings.video_frames == 0:
        return None
    from pipeline.core.media import FrameRule

    return FrameRule(
        max_frames=settings.video_frames, max_seconds=settings.video_max_seconds, max_bytes=settings.video_max_bytes,
        max_decoded_frames=settings.video_max_decoded_frames, decode_timeout_s=settings.video_decode_timeout_s,
    )  # fmt: skip


def with_frames(images: Iterable[DecodedImage]) -> list[DecodedImage]:
    """Decoded uploads and, after each animation or video, its sampled frames (each has its own thumbnail)."""
    from pipeline.core.media import frame_images

    return [one for image in images for one in (image, *(frame_images(image) if image.frames else ()))]


def read_until(check: CheckRow, until: float) -> float:
    """How long a batch waits for `check`'s download: until `until`, the batch's read wait, unless its last attempt
    ran out of time (a source known to be slow: its download starts, and it leaves the batch at once)."""
    return time.monotonic() if check.error_code in SLOW_CODES else until


def defer(ledger: Ledger, session: Session, lease: Lease, deferred: list[tuple[CheckRow, Deferred]]) -> None:
    """Hands the checks that left their batch back to the ledger, each claimable again after its own delay: one
    statement per distinct delay (a batch's late checks mostly share one)."""
    now, by_delay = utcnow(), defaultdict(list)
    for check, why in deferred:
        by_delay[round(why.delay_s, 1)].append(check.id)
    for delay_s, check_ids in sorted(by_delay.items()):
        ledger.defer(session, lease, check_ids, now + timedelta(seconds=delay_s))


def report_deferred(batch: Any) -> None:
    """Counts and logs a batch's deferrals once they are committed; its heartbeat expects their checks no more."""
    for reason, count in Counter(why.reason for _, why in batch.deferred).items():
        metrics.FETCH_DEFERRED.labels(reason).inc(count)
    for check, why in batch.deferred:
        extra = {"check_id": check.id, "external_id": check.external_id, "stage": "read", "code": why.code}
        log.info("check deferred for %.1fs: %s", why.delay_s, why.message, extra=extra)
    if batch.deferred and batch.renewal is not None:
        batch.renewal.checks -= len(batch.deferred)


def thumbnails(images: Iterable[DecodedImage], max_side: int) -> list[Thumbnail]:
    """One thumbnail per distinct image, for the console to show without fetching anything itself. A thumbnail
    is a convenience: one that cannot be made is skipped, and never costs its check anything."""
    made: dict[str, Thumbnail] = {}
    for image in images:
        if image.sha256 in made:
            continue
        try:
            data, width, height = thumbnail_jpeg(image.image, max_side)
        except Exception:
            log.debug("no thumbnail of image %s", image.sha256, exc_info=True)
            continue
        made[image.sha256] = Thumbnail(image.sha256, data, width, height)
    return list(made.values())
