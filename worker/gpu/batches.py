"""What a batch of checks goes through, as plain functions over the ledger and the detector (no broker here).

A worker claims up to `batch_size` ready checks of its pipeline version from the ledger under a lease (see
`worker.gpu.loop`), and this runs them: stored answers and artifacts first, then fetching and decoding, the models
once per distinct image, and one transaction for artifacts, results and outbox rows. Every change to a check
names the lease token, so a worker that lost its lease (it stalled, another took over) can never overwrite
the new owner's work. Metrics and logs of an outcome are emitted only once its transaction has committed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from pipeline.core import codec
from pipeline.core.batches import Reader, once_per_image
from pipeline.core.detector import Detector
from pipeline.core.devices import free_gpu_memory, is_out_of_memory, is_sticky_cuda_error
from pipeline.core.errors import ItemError
from pipeline.core.imaging import DecodedImage
from pipeline.core.pdq import MIN_QUALITY
from pipeline.core.prepared import Prepared
from pipeline.core.provenance import ProvenanceReader
from pipeline.core.results import Artifacts
from worker.gpu import faults, frames, near_copies, reading
from worker.gpu.near_copies import Likeness
from worker.gpu.outcomes import Outcomes, about, end_checks, queue_deliveries, result_of, result_of_detection
from worker.intake.text import storable_tree
from worker.ledger import near, reviews
from worker.ledger.claims import FairShare
from worker.ledger.engine import INFRASTRUCTURE_ERRORS
from worker.ledger.models import CheckRow
from worker.ledger.reviews import Thumbnail
from worker.ledger.states import Priority
from worker.ledger.store import Lease, Ledger, LedgerTally
from worker.ops import metrics
from worker.settings import Settings
from worker.sources import kinds as sources
from worker.sources.downloads import Deferred, Downloads
from worker.sources.provenance import provenance_reader

log = logging.getLogger("item.worker")

TIMEOUT_MESSAGE = "The check's batch ran past its time budget (ITEM_BATCH_TIME_BUDGET_S)."


class TransientError(ItemError):
    """Worth trying again later: the same input may well succeed (timeouts, 5xx, out of memory)."""

    permanent = False


@dataclass
class Batch:
    """A claimed batch on its way through a worker: prepared (read, decoded, looked up), run, then stored.

    Each phase may run on its own thread (see `worker.gpu.loop`), so a batch carries everything the next phase
    needs, and what it cost: ledger statements and time, reading and model time.
    """

    checks: list[CheckRow]
    lease: Lease
    deadline: float  # time.monotonic() by which it must be stored (the batch's time budget)
    images: dict[str, DecodedImage | None] = field(default_factory=dict)  # to run, by check id; None: features
    known: dict[str, Artifacts] = field(default_factory=dict)  # stored artifacts, by sha256
    todo: list[CheckRow] = field(default_factory=list)  # the checks the models run
    answers: dict[str, dict] = field(default_factory=dict)  # by check id: an earlier check of the same bytes
    errors: list[tuple[CheckRow, ItemError, str]] = field(default_factory=list)  # (check, why, stage)
    deferred: list[tuple[CheckRow, Deferred]] = field(default_factory=list)  # left it: their bytes were late
    detections: dict = field(default_factory=dict)  # by sha256 (a frame's: its key)
    media: dict[str, dict] = field(default_factory=dict)  # by check id: a video's or animation's frames (`frames`)
    likeness: Likeness = field(default_factory=Likeness)  # near-copies and bank matches found by PDQ hash
    hashes: dict[str, tuple[str, bytes]] = field(default_factory=dict)  # by check id: (sha256, PDQ) of its image
    thumbnails: list[Thumbnail] = field(default_factory=list)  # of the images decoded, one per sha256
    tally: LedgerTally = field(default_factory=LedgerTally)
    prepared: Prepared | None = None  # the models' host work, done ahead (ITEM_PREPARE_AHEAD)
    prepared_for: list[str] = field(default_factory=list)  # the sha256 of each image `prepared` holds, in order
    read_ms: float = 0.0
    prepare_ms: float = 0.0
    model_ms: float = 0.0
    busy_ms: float = 0.0  # of model_ms, how long the device ran (the simulated device: how long it was held)
    renewal: Any = None  # the heartbeat renewing its lease (see worker.gpu.loop)
    timed_out: bool = False  # its checks were retried as check.timeout: nothing is left to store

    def left_s(self) -> float:
        return self.deadline - time.monotonic()


@dataclass
class CheckService:
    settings: Settings
    ledger: Ledger
    detector: Detector
    reader: Reader = field(init=False)  # fetches and decodes a batch's images a few at a time
    provenance: ProvenanceReader | None = field(init=False)  # None: ITEM_READ_PROVENANCE is off
    downloads: Downloads = field(init=False)  # URLs and S3 objects, read on past their batch's wait
    fair_share: FairShare = field(init=False, default_factory=FairShare)  # claims shared fairly across tenants
    frame_rule: Any = field(init=False)  # how animations and videos are sampled (`FrameRule`); None: not at all

    def __post_init__(self) -> None:
        self.provenance = provenance_reader(self.settings)
        self.frame_rule = reading.frame_rule(self.settings)
        self.reader = Reader(
            max_pixels=self.settings.max_pixels,
            max_bytes=self.settings.max_image_bytes,
            threads=self.settings.fetch_concurrency,
            provenance=self.provenance,
            frames=self.frame_rule,
            perceptual_hash=True,  # near-copies and the bank; a video's frames are not hashed
        )
        self.downloads = reading.downloads_for(self.settings)

    @property
    def artifact_versions(self) -> dict[str, str]:
        """The keys of what is stored of an image: the detector's artifacts, and its provenance when it is read."""
        versions = self.detector.artifact_versions
        return versions if self.provenance is None else {**versions, "provenance": self.provenance.version}

    def _head_only(self, check: CheckRow, stored: dict[str, Artifacts], listings: dict[str, dict]) -> bool:
        """Whether only the head has to run for a check: its image's features are stored, and its provenance when
        read (a trust list changed since: its bytes are read again, its stages still reused); or every frame's
        features of a video or animation sampled by the rule in force."""
        media = listings.get(check.image_sha256)
        if media is not None:
            return all(_has_features(stored.get(key)) for key in frames.frame_keys(media))
        known = stored.get(check.image_sha256)
        return _has_features(known) and (self.provenance is None or known.provenance is not None)

    @property
    def version_id(self) -> str:
        return self.detector.pipeline_version.id

    def register_version(self, *, activate: bool = False) -> bool:
        """Registers this worker's version; it becomes the active one only when asked to, or when no version is
        active yet (the first version of an empty ledger). Returns whether it is the active version."""
        with self.ledger.session() as session:
            self.ledger.ensure_pipeline_version(
                session, self.detector.pipeline_version, self.detector.profile.name, activate=False
            )
            active = self.ledger.active_version(session)
            if activate or active is None:
                self.ledger.activate_version(session, self.version_id)
                return True
            return active.id == self.version_id

    # ------------------------------------------------------------------ claiming

    def claim(self, lease: Lease, limit: int, priority: int) -> list[CheckRow]:
        with self.ledger.session() as session:
            return self.ledger.claim(
                session,
                pipeline_version_id=self.version_id,
                limit=limit,
                lease=lease,
                max_attempts=self.settings.max_attempts,
                priority=priority,
                fair=self.fair_share,  # this loop's shares across tenants, kept from claim to claim
            )

    def claim_batch(self, lease: Lease) -> list[CheckRow]:
        """A batch, fresh uploads first: up to batch_size of them, waiting up to batch_max_wait_s to fill it; with
        no fresh check ready, re-scores: up to rescore_batch_size at once (stored artifacts make them cheap)."""
        size = self.settings.batch_size
        claimed = self.claim(lease, size, Priority.fresh)
        if not claimed:
            return self.claim(lease, self.settings.rescore_batch_size, Priority.rescore)
        deadline = time.monotonic() + self.settings.batch_max_wait_s
        while len(claimed) < size and time.monotonic() < deadline:
            time.sleep(0.05)
            try:
                claimed += self.claim(lease, size - len(claimed), Priority.fresh)
            except INFRASTRUCTURE_ERRORS:  # what is claimed is committed: run it, or its attempt is lost
                log.info("the ledger broke while filling a batch; running the %d checks claimed", len(claimed))
                break
        if claimed:
            metrics.claimed(len(claimed), [row.enqueued_at or row.created_at for row in claimed])
        return claimed

    def release(self, batch: Batch) -> int:
        """Gives back a batch claimed but never run (the worker is stopping): claimable at once, attempt unused."""
        with self.ledger.session() as session:
            return self.ledger.release(session, batch.lease)

    # ------------------------------------------------------------------ running

    def run_batch(self, checks: list[CheckRow], lease: Lease, deadline: float | None = None) -> None:
        """Prepares, runs and stores a batch in this thread (`worker.gpu.loop` overlaps the phases of batches)."""
        batch = Batch(checks, lease, deadline or time.monotonic() + self.settings.batch_time_budget_s)
        self.prepare(batch)
        self.run_models(batch)
        self.store(batch)

    def prepare(self, batch: Batch) -> None:
        """Everything before the models: stored artifacts and blobs, fetching and decoding, answers for bytes
        already checked under this version, or for near-copies of them (`near_copies`), and the bank's matches. A
        check whose bytes were seen before (a re-score) skips decoding, and even fetching, when its features are
        stored under this pipeline's stages (a video's: every frame's): only the head runs for it. A check whose
        download is late leaves the batch (deferred, in the same transaction as the answers).
        """
        versions = self.artifact_versions
        known_bytes = sorted({check.image_sha256 for check in batch.checks if check.image_sha256})
        rule = self.frame_rule.id if self.frame_rule is not None else None

        def stored_and_blobs(session: Session) -> tuple:
            facts = self.ledger.image_facts(session, known_bytes) if known_bytes else {}
            listings = {sha: m for sha, (media, *_) in facts.items() if (m := frames.stored_listing(media, rule))}
            keys = known_bytes + [key for media in listings.values() for key in frames.frame_keys(media)]
            stored = self.ledger.load_artifacts(session, keys, versions) if keys else {}
            to_read = [check for check in batch.checks if not self._head_only(check, stored, listings)]
            names = _blob_names(to_read)
            blobs = self.ledger.get_blobs(session, names) if names else {}
            return stored, listings, {sha: (pdq, quality) for sha, (_, pdq, quality) in facts.items()}, to_read, blobs

        stored, listings, hashes, to_read, blobs = reading.in_transaction(self.ledger, batch, stored_and_blobs)
        # Read only for their provenance (stored before it was, or under another trust list): one whose image is
        # gone is still scored from its features, without provenance, rather than failed.
        optional = {check.id for check in to_read if _has_features(stored.get(check.image_sha256))}
        images = {check.id: None for check in batch.checks if check not in to_read}
        images |= self._read(batch, to_read, blobs, optional)
        ready = [check for check in batch.checks if check.id in images]
        sha_by_check = {check.id: _sha_of(check, images[check.id]) for check in ready}
        for check in ready:
            image = images[check.id]
            media = frames.listing(image) if frames.is_media(image) else None
            if image is None and check.image_sha256 in listings:
                media = listings[check.image_sha256]
            if media is not None:
                batch.media[check.id] = media
            pdq, quality = (image.pdq, image.pdq_quality) if image else hashes.get(check.image_sha256, (None, None))
            if pdq is not None and quality >= MIN_QUALITY:  # a flat picture's hash matches other flat pictures
                batch.hashes[check.id] = (sha_by_check[check.id], pdq)

        def earlier_and_known(session: Session) -> tuple:
            reading.defer(self.ledger, session, batch.lease, batch.deferred)
            earlier = self.ledger.done_checks_for_images(session, list(sha_by_check.values()), self.version_id)
            hashed = [(check, *batch.hashes[check.id]) for check in ready if check.id in batch.hashes]
            likeness = near_copies.look_up(session, hashed, self.version_id, self.settings) if hashed else Likeness()
            wanted = {key for check in ready for key in self._unit_keys(check, sha_by_check[check.id], batch)}
            unknown = sorted(key for key in wanted if key not in stored and key not in earlier)
            return (
                earlier,
                likeness,
                stored | (self.ledger.load_artifacts(session, unknown, versions) if unknown else {}),
            )

        earlier, batch.likeness, batch.known = reading.in_transaction(self.ledger, batch, earlier_and_known)
        reading.report_deferred(batch)
        for check in ready:
            sha, near = sha_by_check[check.id], batch.likeness.near.get(check.id)
            done = earlier.get(sha)
            metrics.DUPLICATE_BYTES.labels("miss" if done is None else "hit").inc()
            batch.images[check.id] = images[check.id]  # answered ones too: their image row keeps its hash
            if done is not None:
                batch.answers[check.id] = {**near_copies.unshared(result_of(done)), "timings_ms": {"reused": 0.0}}
            elif near is not None:
                batch.answers[check.id] = near_copies.near_answer(*near, sha)
            else:
                batch.todo.append(check)
        if self.prepares_ahead:
            self._prepare_inputs(batch)

    @staticmethod
    def _unit_keys(check: CheckRow, sha: str, batch: Batch) -> list[str]:
        """The keys a check's artifacts are stored under: its frames' for a video or animation, else its image's."""
        media = batch.media.get(check.id)
        return frames.frame_keys(media) if media is not None else [sha]

    @property
    def models_off_the_cpu(self) -> bool:
        """The models run on a device (or the simulated one): their thread mostly waits, the GIL released."""
        return self.detector.device.type != "cpu" or self.detector.profile.simulated

    @property
    def prepares_ahead(self) -> bool:
        """ITEM_PREPARE_AHEAD; `auto`: on when the models run off the CPU, so the prefetch thread has a core."""
        setting = self.settings.prepare_ahead
        return setting == "on" or (setting == "auto" and self.models_off_the_cpu)

    def _prepare_inputs(self, batch: Batch) -> None:
        """The models' host work for the batch (downscale, processors, pixel copies; `Detector.prepare`), here on
        the prefetch thread while the device runs the batch before. If it fails, the model thread does it again
        and meets the same error there, where a model error is handled per check."""
        unique = _unique_images(batch)
        images = list(unique.values())
        started = time.perf_counter()
        try:
            batch.prepared = self.detector.prepare(images, [batch.known.get(sha) for sha in unique])
            batch.prepared_for = list(unique)
        except Exception:
            log.warning("preparing the models' inputs of a batch failed; the model thread prepares them",
                        exc_info=True)  # fmt: skip
        batch.prepare_ms = (time.perf_counter() - started) * 1000

    def _read(
        self, batch: Batch, checks: list[CheckRow], blobs: dict[str, bytes], optional: set[str]
    ) -> dict[str, DecodedImage | None]:
        """Fetches and decodes on the reader's threads; an input that fails is the batch's error for its check,
        unless reading it was `optional` (its features are stored): then it goes on without pixels. Downloads are
        waited for ITEM_BATCH_READ_WAIT_S: a check whose bytes are not there by then leaves the batch. Thumbnails
        are made here too, while the pixels are at hand, and counted in the batch's reading time."""
        started, images = time.perf_counter(), {}
        until = min(time.monotonic() + self.settings.batch_read_wait_s, batch.deadline)
        for one in self.reader.load(checks, lambda check: self._source_bytes(check, blobs, batch, until)):
            if one.ok:
                images[one.item.id] = self._decoded(one.item, one.image)
            elif isinstance(one.error, Deferred):
                batch.deferred.append((one.item, one.error))
            elif one.item.id in optional:
                log.info("image unreadable; scored from stored features without provenance: %s", one.error.code,
                         extra=about(one.item, "decode", code=one.error.code))  # fmt: skip
                images[one.item.id] = None
            else:
                batch.errors.append((one.item, one.error, "decode"))
        if self.settings.thumbnail_max_side > 0:
            decoded = reading.with_frames(filter(None, images.values()))
            batch.thumbnails = reading.thumbnails(decoded, self.settings.thumbnail_max_side)
        batch.read_ms = (time.perf_counter() - started) * 1000
        return images

    def _source_bytes(self, check: CheckRow, blobs: dict[str, bytes], batch: Batch, until: float) -> bytes:
        """A check's bytes: a download (URL, S3) runs on in the background past `until` if it must, and raises
        `Deferred` (see `worker.sources.downloads`); anything else is read within what the batch has left."""
        if self.downloads.handles(check.source):
            return self.downloads.read(check.id, check.source, reading.read_until(check, until))
        return sources.load(check.source, self.settings, blobs.get, timeout_s=max(0.1, batch.left_s()))

    def run_models(self, batch: Batch) -> None:
        """The models, once per distinct image, with what is stored of each; a model error ends the checks it
        concerns (retried, or failed once attempts run out)."""
        unique = _unique_images(batch)
        pixels = sum(image is not None for image in unique.values())
        # One line per batch, in a fixed shape: operators grep it, and the tests count model runs with it.
        undecodable = sum(stage == "decode" for _, _, stage in batch.errors)
        log.info("batch checks=%d model_images=%d undecodable=%d", len(batch.checks), pixels, undecodable)
        if not unique:
            return
        metrics.artifact_reuse([batch.known.get(key) for key in unique])
        prepared = batch.prepared if batch.prepared_for == list(unique) else None
        started, held_before = time.perf_counter(), self._device_held_s()
        try:
            batch.detections = once_per_image(
                lambda images, known: self._detect(images, known, prepared), unique, batch.known
            )
        except ItemError as error:
            batch.errors += [(check, error, "models") for check in batch.todo]
        except Exception as error:  # a bug or a model crash: retried, and failed once attempts run out
            if is_sticky_cuda_error(error):
                raise  # the device is unusable: the loop retries the batch elsewhere and ends this process
            log.exception("batch of %d checks crashed", len(batch.todo))
            crash = TransientError(f"Internal error: {error!r}", code="check.internal_error")
            batch.errors += [(check, crash, "models") for check in batch.todo]
        finally:
            batch.prepared = None  # pinned pixel buffers: freed now, not when the store thread is done with the batch
            batch.model_ms = (time.perf_counter() - started) * 1000
            held = self._device_held_s()
            batch.busy_ms = batch.model_ms if held is None else (held - held_before) * 1000
            metrics.DEVICE_BUSY.labels(str(self.detector.device)).inc(batch.busy_ms / 1000)

    def _device_held_s(self) -> float | None:
        """The simulated device's busy seconds so far (the `sim` profile); None on a real device, whose busy time
        is taken as the model thread's time in the models (they end by copying results back: a synchronisation)."""
        if not self.detector.profile.simulated:
            return None
        from pipeline.core import simulated

        return simulated.device().busy_s

    def store(self, batch: Batch) -> None:
        """One transaction, a fixed number of statements whatever the batch's size: the images and their
        thumbnails, the artifacts the models made, every result and ending, and their deliveries. Reported once
        it committed."""
        results = dict(batch.answers)
        for check in batch.todo:
            result = self._result(check, batch)
            if result is not None:
                # What a model wrote (a caption, its phrases) and what an image declared (a C2PA signer) may hold
                # NUL or lone surrogates, which the ledger cannot store: kept escaped, never failing the batch.
                results[check.id] = storable_tree(result)
        bank = batch.likeness.bank
        results = {check_id: near_copies.with_bank(result, bank.get(check_id)) for check_id, result in results.items()}

        def write(session: Session) -> Outcomes:
            outcomes = Outcomes(self.version_id)
            self._store_artifacts(session, batch)
            reviews.put_thumbnails(session, batch.thumbnails)
            share = self.settings.review_double_share
            done = self.ledger.finish_done_many(session, batch.lease.token, results, review_double_share=share)
            judged = [(row, *batch.hashes[row.id]) for row in done if row.id in batch.hashes]
            judged = [entry for entry in judged if entry[0].id not in batch.answers]  # the models' own answers
            near.record(session, near_copies.index_entries(judged, self.version_id))
            for row in done:
                outcomes.add("done", row, "store")
            ended = end_checks(session, self.settings, batch.lease, batch.errors, outcomes)
            queue_deliveries(session, done + ended, self.settings)
            return outcomes

        reading.in_transaction(self.ledger, batch, write).report()
        for detection in batch.detections.values():
            metrics.stage_times(detection.timings_ms)
            metrics.stage_runs(detection.computed)
        metrics.gpu_memory()
        tally = batch.tally
        log.info(
            "batch stored checks=%d statements=%d ledger_ms=%.1f read_ms=%.1f prepare_ms=%.1f model_ms=%.1f "
            "busy_ms=%.1f",
            len(batch.checks), tally.statements, tally.ms, batch.read_ms, batch.prepare_ms, batch.model_ms,
            batch.busy_ms,
        )  # fmt: skip

    def _result(self, check: CheckRow, batch: Batch) -> dict | None:
        """A check's result from the batch's detections (a video's from its frames'); None if the models failed."""
        sha, media = _sha_of(check, batch.images[check.id]), batch.media.get(check.id)
        if media is not None:
            if not all(key in batch.detections for key in frames.frame_keys(media)):
                return None
            return frames.media_result(sha, media, batch.detections, self.settings.video_flag_frames)
        return result_of_detection(batch.detections[sha], sha) if sha in batch.detections else None

    def _store_artifacts(self, session: Session, batch: Batch) -> None:
        """The decoded images and what the models made of them that is not stored yet, under the kinds the
        settings keep (ITEM_STORE_ARTIFACTS)."""
        kept = set(self.settings.store_artifacts)
        versions = {kind: key for kind, key in self.artifact_versions.items() if kind in kept}
        fresh_images = [image for image in batch.images.values() if image is not None]
        listings = {image.sha256: frames.listing(image) for image in fresh_images if frames.is_media(image)}
        self.ledger.upsert_images(session, list({image.sha256: image for image in fresh_images}.values()), listings)
        new = {}
        for sha, detection in batch.detections.items():
            known = batch.known.get(sha)
            new[sha] = (detection.artifacts, {kind: key for kind, key in versions.items() if _missing(known, kind)})
        self.ledger.save_artifacts_many(session, new)

    def time_out(self, batch: list[CheckRow], lease: Lease) -> None:
        """The batch ran past its budget: each check still held is retried as `check.timeout` (or failed)."""
        self.fail(batch, TransientError(TIMEOUT_MESSAGE, code="check.timeout"), lease, stage="batch")

    def _decoded(self, check: CheckRow, image: DecodedImage) -> DecodedImage:
        if check.image_sha256 and image.sha256 != check.image_sha256:
            # A URL or object that changed since it was checked: these are other bytes, scored as they are now.
            log.info("image changed since its earlier check", extra=about(check, "decode"))
        return image

    def _detect(self, images: list[DecodedImage], known: list, prepared: Prepared | None = None) -> list:
        """Runs the models (on `prepared` inputs when they were prepared ahead). Each stage halves its own runs when
        the GPU runs out of memory; what still runs out (one image too large for a stage, or memory outside the
        stages) halves the batch of checks."""
        try:
            faults.strike("models")  # tests only (worker.gpu.faults): a CUDA error or a long call here
            return self.detector.detect(images, known, prepared)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            if len(images) == 1:
                raise TransientError(
                    "The GPU ran out of memory on a single image.", code="gpu.out_of_memory"
                ) from error
            free_gpu_memory()
            half, end = len(images) // 2, len(images)
            first, second = (None, None) if prepared is None else (prepared.part(0, half), prepared.part(half, end))
            return self._detect(images[:half], known[:half], first) + self._detect(images[half:], known[half:], second)

    # ------------------------------------------------------------------ outcomes

    def fail(self, checks: list[CheckRow], error: ItemError, lease: Lease, stage: str) -> None:
        """Ends `checks` for `error` in one transaction (see `_end`). Checks this lease no longer holds are left
        alone."""
        outcomes = Outcomes(self.version_id)
        with self.ledger.session() as session:
            ended = end_checks(session, self.settings, lease, [(c, error, stage) for c in checks], outcomes)
            queue_deliveries(session, ended, self.settings)
        outcomes.report()


def _unique_images(batch: Batch) -> dict[str, DecodedImage | None]:
    """The batch's images to run (a video's: its frames), once per distinct key, in the order of its checks."""
    unique: dict[str, DecodedImage | None] = {}
    for check in batch.todo:
        image = batch.images[check.id]
        unique |= frames.units(image, batch.media.get(check.id), _sha_of(check, image))
    return unique


def _missing(known: Artifacts | None, kind: str) -> bool:
    return known is None or codec.get_field(known, kind) is None


def _blob_names(checks: list[CheckRow]) -> list[str]:
    return [check.source["blob"] for check in checks if isinstance(check.source.get("blob"), str)]


def _has_features(artifacts: Artifacts | None) -> bool:
    return artifacts is not None and artifacts.features is not None


def _sha_of(check: CheckRow, image: DecodedImage | None) -> str:
    return image.sha256 if image is not None else check.image_sha256
