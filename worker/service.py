"""What a check goes through, as plain functions over the ledger and the detector (no Celery in here).

Batching comes from the ledger, not the broker: a delivered message makes sure its check exists, then the
worker claims up to `batch_size` queued checks of its pipeline version (SKIP LOCKED on Postgres) and runs
them through the models together. A message whose check another batch is running re-enqueues itself for
later; one whose check is finished does nothing. So Redis may lose, duplicate or delay messages: the ledger
decides, results are written once, and the reconciler re-sends whatever sits unfinished too long.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial

from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import InterfaceError, OperationalError

from pipeline.detector import Detector
from pipeline.errors import ItemError
from pipeline.imaging import DecodedImage, decode_image
from worker import metrics, sources
from worker.ledger.models import TERMINAL_STATUSES, CheckRow, CheckStatus
from worker.ledger.store import Ledger
from worker.settings import Settings

log = logging.getLogger("item.worker")

Enqueue = Callable[[dict, float], None]  # (task kwargs, countdown seconds) → sends an `item.check` message


# Database and broker outages: nothing can be recorded, so the message itself is retried. Only connection-level
# errors: a programming error retried would just fail again, forever.
INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError, BrokerError, ConnectionError, TimeoutError)


class TransientError(ItemError):
    """Worth trying again later: the same input may well succeed (timeouts, 5xx, out of memory)."""

    permanent = False


@dataclass
class CheckService:
    settings: Settings
    ledger: Ledger
    detector: Detector
    enqueue: Enqueue
    current_batch: list[str] = field(default_factory=list)  # check ids, for the time-budget handler

    @property
    def version_id(self) -> str:
        return self.detector.pipeline_version.id

    def register_version(self) -> None:
        with self.ledger.session() as session:
            self.ledger.ensure_pipeline_version(session, self.detector.pipeline_version, self.detector.profile.name)

    # ------------------------------------------------------------------ receiving

    def receive(self, external_id: str, image: dict, check_id: str | None = None) -> None:
        """Handles one `item.check` message: make sure the check exists, then run a batch that includes it."""
        check = self._ensure_check(external_id, image, check_id)
        if check is None or check.status in TERMINAL_STATUSES:
            return
        if check.pipeline_version_id != self.version_id:
            log.warning("check %s is for %s; this worker runs %s", check.id, check.pipeline_version_id, self.version_id)
            return
        batch = self.claim(check.id)
        if batch:
            metrics.claimed(len(batch), [row.enqueued_at or row.created_at for row in batch])
        if not any(row.id == check.id for row in batch):
            # Another worker's batch holds it: look again once that batch must have ended.
            self.enqueue(_message(check), self.settings.check_time_budget_s)
        if batch:
            self.run_batch(batch)

    def _ensure_check(self, external_id: str, image: dict, check_id: str | None) -> CheckRow | None:
        with self.ledger.session() as session:
            if check_id:
                return self.ledger.get_check(session, check_id)
            try:
                source = sources.to_stored(image, self.settings, partial(self.ledger.put_blob, session))
            except ItemError as error:  # malformed message from a foreign client: still gets a ledger row
                check, created = self.ledger.create_check(
                    session, external_id=external_id, pipeline_version_id=self.version_id, source={"invalid": True}
                )
                if created:  # never reject an earlier, valid check that happens to share the external id
                    self.ledger.finish_rejected(session, check.id, error.code, error.message)
                    metrics.finished("rejected", error.code, check.created_at)
                return None
            check, _ = self.ledger.create_check(
                session, external_id=external_id, pipeline_version_id=self.version_id, source=source
            )
            return check

    # ------------------------------------------------------------------ claiming

    def claim(self, check_id: str) -> list[CheckRow]:
        """This check plus up to batch_size - 1 queued ones, waiting up to batch_max_wait_s to fill the batch."""
        deadline = time.monotonic() + self.settings.batch_max_wait_s
        claimed = self._claim_once(check_id, self.settings.batch_size)
        while len(claimed) < self.settings.batch_size and time.monotonic() < deadline:
            time.sleep(0.05)
            claimed += self._claim_once(None, self.settings.batch_size - len(claimed))
        return claimed

    def _claim_once(self, check_id: str | None, limit: int) -> list[CheckRow]:
        # A running check untouched for a whole time budget belongs to a worker that died.
        stale_before = datetime.now(UTC) - timedelta(seconds=self.settings.check_time_budget_s)
        with self.ledger.session() as session:
            return self.ledger.claim(
                session,
                pipeline_version_id=self.version_id,
                limit=limit,
                stale_before=stale_before,
                max_attempts=self.settings.max_attempts,
                first=check_id,
            )

    # ------------------------------------------------------------------ running

    def run_batch(self, batch: list[CheckRow]) -> None:
        """Decodes, answers duplicates from the ledger, runs the models on the rest, stores everything."""
        self.current_batch = [check.id for check in batch]
        decoded: dict[str, DecodedImage] = {}
        for check in batch:
            try:
                decoded[check.id] = self._decode(check)
            except ItemError as error:
                self._fail_one(check, error, stage="decode")
        todo = self._answer_known_bytes([c for c in batch if c.id in decoded], decoded)
        images = len({decoded[c.id].sha256 for c in todo})
        # One line per batch, in a fixed shape: operators grep it, and the tests count model runs with it.
        log.info("batch checks=%d model_images=%d undecodable=%d", len(batch), images, len(batch) - len(decoded))
        if todo:
            try:
                self._detect_and_store(todo, decoded)
            except INFRASTRUCTURE_ERRORS:
                raise  # the ledger is unreachable: the message itself is retried
            except ItemError as error:
                for check in todo:
                    self._fail_one(check, error, stage="models")
            except Exception as error:  # a bug or a model crash: retried, and failed once attempts run out
                log.exception("batch of %d checks crashed", len(todo))
                crash = TransientError(f"Internal error: {error!r}", code="check.internal_error")
                for check in todo:
                    self._fail_one(check, crash, stage="models")

    def _decode(self, check: CheckRow) -> DecodedImage:
        data = self._load_bytes(check.source)
        return decode_image(data, max_pixels=self.settings.max_pixels, max_bytes=self.settings.max_image_bytes)

    def _load_bytes(self, source: dict) -> bytes:
        kind, value = sources.validate(source)
        if kind == "blob":
            with self.ledger.session() as session:
                data = self.ledger.get_blob(session, value)
            if data is None:
                raise sources.SourceError(f"Stored image {value} is gone.", code="source.blob_missing")
            return data
        if kind == "url":
            return sources.fetch(value, self.settings)
        if kind == "path":
            return sources.read_path(value, self.settings)
        return sources.decode_b64(value, self.settings)

    def _answer_known_bytes(self, batch: list[CheckRow], decoded: dict[str, DecodedImage]) -> list[CheckRow]:
        """Bytes already checked under this pipeline version get that answer; returns the checks still to run."""
        todo = []
        with self.ledger.session() as session:
            for check in batch:
                image = decoded[check.id]
                done = self.ledger.done_check_for_image(session, image.sha256, self.version_id)
                metrics.DUPLICATE_BYTES.labels("miss" if done is None else "hit").inc()
                if done is None:
                    todo.append(check)
                    continue
                self._done(session, check, {**_result_of(done), "timings_ms": {"reused": 0.0}})
        return todo

    def _detect_and_store(self, todo: list[CheckRow], decoded: dict[str, DecodedImage]) -> None:
        unique = list({decoded[c.id].sha256: decoded[c.id] for c in todo}.values())  # same bytes twice: once
        versions = self.detector.artifact_versions
        with self.ledger.session() as session:
            known = self.ledger.load_artifacts(session, [image.sha256 for image in unique], versions)
        _count_reuse(known, unique)
        detections = self._detect(unique, [known.get(image.sha256) for image in unique])
        by_sha = {d.sha256: d for d in detections}
        with self.ledger.session() as session:  # one transaction: artifacts and results land together
            for image in unique:
                self.ledger.upsert_image(session, image)
                self.ledger.save_artifacts(session, image.sha256, by_sha[image.sha256].artifacts, versions)
            for check in todo:
                self._done(session, check, _result_of_detection(by_sha[decoded[check.id].sha256]))
        for detection in detections:
            metrics.stage_times(detection.timings_ms)
        metrics.gpu_memory()

    def _detect(self, images: list[DecodedImage], known: list) -> list:
        """Runs the models; on GPU out-of-memory, halves the batch instead of failing it."""
        try:
            return self.detector.detect(images, known)
        except Exception as error:
            if not _is_out_of_memory(error):
                raise
            if len(images) == 1:
                raise TransientError(
                    "The GPU ran out of memory on a single image.", code="gpu.out_of_memory"
                ) from error
            _free_gpu_memory()
            half = len(images) // 2
            return self._detect(images[:half], known[:half]) + self._detect(images[half:], known[half:])

    # ------------------------------------------------------------------ failures

    def _fail_one(self, check: CheckRow, error: ItemError, stage: str) -> None:
        if not error.permanent:
            self.retry_later(check, error.code, error.message, stage)
            return
        with self.ledger.session() as session:
            if self.ledger.finish_rejected(session, check.id, error.code, error.message):
                metrics.finished("rejected", error.code, check.created_at)
                log.info("check rejected: %s", error.message, extra=_about(check, stage, code=error.code))

    def retry_later(self, check: CheckRow, code: str, message: str, stage: str) -> None:
        """Back to queued with exponential backoff and jitter, or `failed` once attempts are used up."""
        if check.attempts >= self.settings.max_attempts:
            self._failed(check, code, message, stage)
            return
        with self.ledger.session() as session:
            self.ledger.mark_queued(session, check.id, error_code=code, error_message=message)
        delay = self.backoff(check.attempts)
        metrics.RETRIES.labels(code).inc()
        log.info("check retried in %.1fs: %s", delay, message, extra=_about(check, stage, code=code))
        self.enqueue(_message(check), delay)

    def _done(self, session, check: CheckRow, result: dict) -> None:
        if self.ledger.finish_done(session, check.id, **result):
            metrics.finished("done", None, check.created_at)
            metrics.scored(self.version_id, result["p_fake"], result["verdict"] == "fake")
            log.info("check done: %s %.3f", result["verdict"], result["p_fake"], extra=_about(check, "store"))

    def _failed(self, check: CheckRow, code: str, message: str, stage: str) -> None:
        with self.ledger.session() as session:
            if self.ledger.finish_failed(session, check.id, code, message):
                metrics.finished("failed", code, check.created_at)
                log.warning("check failed: %s", message, extra=_about(check, stage, code=code))

    def backoff(self, attempts: int) -> float:
        delay = min(self.settings.retry_backoff_max_s, self.settings.retry_backoff_s * 2 ** max(0, attempts - 1))
        return delay * random.uniform(0.5, 1.5)

    def fail_batch_on_timeout(self, batch_ids: list[str]) -> None:
        """The batch ran past its time budget: each unfinished check is retried (or failed)."""
        with self.ledger.session() as session:
            rows = [self.ledger.get_check(session, check_id) for check_id in batch_ids]
        for check in rows:
            if check is not None and check.status == CheckStatus.running:
                self.retry_later(check, "check.timeout", "The check ran past its time budget.", "batch")

    # ------------------------------------------------------------------ reconciling

    def reconcile(self) -> int:
        """Re-sends every check of this version that sits queued/running past `reconcile_after_s`."""
        older_than = timedelta(seconds=self.settings.reconcile_after_s)
        with self.ledger.session() as session:
            stuck = [
                check
                for check in self.ledger.stuck_checks(session, older_than)
                if check.pipeline_version_id == self.version_id
            ]
        for check in stuck:
            if check.attempts >= self.settings.max_attempts:
                self._failed(check, "check.stuck", "No worker finished this check.", "reconcile")
                continue
            with self.ledger.session() as session:
                self.ledger.mark_queued(session, check.id)  # keeps the last error
            log.info("stuck check re-queued", extra=_about(check, "reconcile"))
            self.enqueue(_message(check), 0.0)
        return len(stuck)


def _message(check: CheckRow) -> dict:
    return {"external_id": check.external_id, "image": check.source, "check_id": check.id}


def _about(check: CheckRow, stage: str, **fields) -> dict:
    """The `extra` of every log line about a check: which check, for which upload, at which stage."""
    return {"check_id": check.id, "external_id": check.external_id, "stage": stage, **fields}


def _count_reuse(known: dict, images: list[DecodedImage]) -> None:
    for image in images:
        artifacts = known.get(image.sha256)
        for artifact in ("caption", "objects", "embeddings", "features"):
            hit = artifacts is not None and getattr(artifacts, artifact) is not None
            metrics.ARTIFACT_REUSE.labels(artifact, "hit" if hit else "miss").inc()


def _result_of(done: CheckRow) -> dict:
    fields = ("image_sha256", "p_fake", "verdict", "threshold", "caption", "objects", "object_count")
    return {field: getattr(done, field) for field in fields}


def _result_of_detection(d) -> dict:
    as_dict = d.to_dict()
    return {
        "image_sha256": d.sha256,
        "p_fake": d.p_fake,
        "verdict": d.verdict,
        "threshold": d.threshold,
        "caption": d.caption,
        "objects": as_dict["objects"],
        "object_count": d.object_count,
        "timings_ms": as_dict["timings_ms"],
    }


def _is_out_of_memory(error: Exception) -> bool:
    import torch

    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def _free_gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
