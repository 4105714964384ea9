"""What a check goes through, as plain functions over the ledger and the detector (no Celery in here).

Batching comes from the ledger, not the broker: a delivered message makes sure its check exists, then the
worker claims up to `batch_size` queued checks of its pipeline version (SKIP LOCKED on Postgres) and runs
them through the models together. A message whose check another batch is running re-enqueues itself for
later; one whose check is finished does nothing. So Redis may lose, duplicate or delay messages: the ledger
decides, results are written once, and the reconciler re-sends whatever sits unfinished too long.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial

from kombu.exceptions import OperationalError as BrokerError
from sqlalchemy.exc import InterfaceError, OperationalError

from pipeline.core import codec
from pipeline.core.batches import Reader, once_per_image
from pipeline.core.detector import Detector
from pipeline.core.errors import ItemError
from pipeline.core.imaging import DecodedImage
from pipeline.core.results import Artifacts
from worker import metrics, sources
from worker.callbacks import checked_callback_url
from worker.ledger import outbox
from worker.ledger.models import CheckRow
from worker.ledger.states import TERMINAL_STATUSES, CheckStatus, Priority
from worker.ledger.store import Ledger
from worker.settings import CHECK_QUEUE, RESCORE_QUEUE, Settings, backoff_s

log = logging.getLogger("item.worker")

# (task kwargs, countdown seconds, queue) → sends an `item.check` message
Enqueue = Callable[[dict, float, str], None]


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
    reader: Reader = field(init=False)  # fetches and decodes a batch's images a few at a time

    def __post_init__(self) -> None:
        self.reader = Reader(max_pixels=self.settings.max_pixels, max_bytes=self.settings.max_image_bytes)

    @property
    def version_id(self) -> str:
        return self.detector.pipeline_version.id

    def register_version(self) -> None:
        with self.ledger.session() as session:
            self.ledger.ensure_pipeline_version(session, self.detector.pipeline_version, self.detector.profile.name)

    # ------------------------------------------------------------------ receiving

    def receive(self, external_id: str, image: dict, check_id: str | None = None, callback_url: str | None = None):
        """Handles one `item.check` message: make sure the check exists, then run a batch that includes it."""
        check = self._ensure_check(external_id, image, check_id, callback_url)
        if check is None or check.status in TERMINAL_STATUSES:
            return
        if check.pipeline_version_id != self.version_id:
            log.warning("check %s is for %s; this worker runs %s", check.id, check.pipeline_version_id, self.version_id)
            return
        batch = self.claim(check.id)
        if batch:
            metrics.claimed(len(batch), [row.enqueued_at or row.created_at for row in batch])
        if not any(row.id == check.id for row in batch):
            self._look_again(check.id)
        if batch:
            self.run_batch(batch)

    def _look_again(self, check_id: str) -> None:
        """This message's check was not in the batch: fresh checks went first, or another worker holds it."""
        with self.ledger.session() as session:
            check = self.ledger.get_check(session, check_id)
        if check is None or check.status in TERMINAL_STATUSES:
            return
        # Still queued: it only waited behind other work, so its turn comes with the next message. Running: another
        # worker's batch holds it, so look again once that batch must have ended.
        later = 0.0 if check.status == CheckStatus.queued else self.settings.batch_time_budget_s
        self.enqueue(_message(check), later, queue_of(check))

    def _ensure_check(
        self, external_id: str, image: dict, check_id: str | None, callback_url: str | None
    ) -> CheckRow | None:
        with self.ledger.session() as session:
            if check_id:
                return self.ledger.get_check(session, check_id)
            create = partial(
                self.ledger.create_check, session, external_id=external_id, pipeline_version_id=self.version_id
            )
            try:
                callback_url = checked_callback_url(callback_url)
                source = sources.to_stored(image, self.settings, partial(self.ledger.put_blob, session))
            except ItemError as error:  # malformed message from a foreign client: still gets a ledger row
                valid_callback = error.code != "callback.invalid"  # the platform still hears of the rejection
                check, created = create(source={"invalid": True}, callback_url=callback_url if valid_callback else None)
                if created:  # never reject an earlier, valid check that happens to share the external id
                    self._finished(session, self.ledger.finish_rejected(session, check.id, error.code, error.message))
                    metrics.finished("rejected", error.code, check.created_at)
                return None
            check, _ = create(source=source, callback_url=callback_url)
            return check

    # ------------------------------------------------------------------ claiming

    def claim(self, check_id: str) -> list[CheckRow]:
        """A batch for this worker, fresh uploads first; the arriving check is in it when its priority's turn came.

        Fresh checks: up to batch_size, waiting up to batch_max_wait_s to fill the batch. With no fresh check
        waiting, re-scores: up to rescore_batch_size at once (their stored artifacts make them cheap), no waiting.
        """
        deadline = time.monotonic() + self.settings.batch_max_wait_s
        size = self.settings.batch_size
        claimed = self._claim_once(check_id, size, Priority.fresh)
        if not claimed:
            return self._claim_once(check_id, self.settings.rescore_batch_size, Priority.rescore)
        while len(claimed) < size and time.monotonic() < deadline:
            time.sleep(0.05)
            claimed += self._claim_once(None, size - len(claimed), Priority.fresh)
        return claimed

    def _claim_once(self, check_id: str | None, limit: int, priority: int = Priority.fresh) -> list[CheckRow]:
        # A running check untouched for a whole time budget belongs to a worker that died.
        stale_before = datetime.now(UTC) - timedelta(seconds=self.settings.batch_time_budget_s)
        with self.ledger.session() as session:
            return self.ledger.claim(
                session,
                pipeline_version_id=self.version_id,
                limit=limit,
                stale_before=stale_before,
                max_attempts=self.settings.max_attempts,
                first=check_id,
                priority=priority,
            )

    # ------------------------------------------------------------------ running

    def run_batch(self, batch: list[CheckRow]) -> None:
        """Answers what stored results and artifacts can, decodes the rest, runs the models, stores everything.

        A check whose bytes were seen before (a re-score) skips decoding, and even fetching, when its features are
        stored under this pipeline's stages: only the head runs for it.
        """
        self.current_batch = [check.id for check in batch]
        images: dict[str, DecodedImage | None] = {}  # by check id; None: stored features stand in for pixels
        stored = self._stored_artifacts(batch)
        to_decode = []
        for check in batch:
            if _has_features(stored.get(check.image_sha256)):
                images[check.id] = None
            else:
                to_decode.append(check)
        blobs = self._blobs(to_decode)  # one query here: the reader's threads never touch the ledger
        for one in self.reader.load(to_decode, lambda check: sources.load(check.source, self.settings, blobs.get)):
            if one.ok:
                images[one.item.id] = self._decoded(one.item, one.image)
            else:
                self._fail_one(one.item, one.error, stage="decode")
        ready = [check for check in batch if check.id in images]
        todo = self._answer_known_bytes(ready, {c.id: _sha_of(c, images[c.id]) for c in ready})
        pixels = len({images[c.id].sha256 for c in todo if images[c.id] is not None})
        # One line per batch, in a fixed shape: operators grep it, and the tests count model runs with it.
        log.info("batch checks=%d model_images=%d undecodable=%d", len(batch), pixels, len(batch) - len(ready))
        if todo:
            try:
                self._detect_and_store(todo, images, stored)
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

    def _stored_artifacts(self, batch: list[CheckRow]) -> dict[str, Artifacts]:
        """Artifacts under this pipeline's keys for the checks whose image is already known (re-scores)."""
        known = sorted({check.image_sha256 for check in batch if check.image_sha256})
        if not known:
            return {}
        with self.ledger.session() as session:
            return self.ledger.load_artifacts(session, known, self.detector.artifact_versions)

    def _blobs(self, checks: list[CheckRow]) -> dict[str, bytes]:
        """The stored bytes of the inline images among `checks`."""
        wanted = [check.source["blob"] for check in checks if isinstance(check.source.get("blob"), str)]
        if not wanted:
            return {}
        with self.ledger.session() as session:
            return self.ledger.get_blobs(session, wanted)

    def _decoded(self, check: CheckRow, image: DecodedImage) -> DecodedImage:
        if check.image_sha256 and image.sha256 != check.image_sha256:
            # A URL or object that changed since it was checked: these are other bytes, scored as they are now.
            log.info("image changed since its earlier check", extra=_about(check, "decode"))
        return image

    def _answer_known_bytes(self, batch: list[CheckRow], sha_by_check: dict[str, str]) -> list[CheckRow]:
        """Bytes already checked under this pipeline version get that answer; returns the checks still to run."""
        todo = []
        with self.ledger.session() as session:
            answers = self.ledger.done_checks_for_images(session, list(sha_by_check.values()), self.version_id)
            for check in batch:
                done = answers.get(sha_by_check[check.id])
                metrics.DUPLICATE_BYTES.labels("miss" if done is None else "hit").inc()
                if done is None:
                    todo.append(check)
                    continue
                self._done(session, check, {**_result_of(done), "timings_ms": {"reused": 0.0}})
        return todo

    def _detect_and_store(
        self, todo: list[CheckRow], images: dict[str, DecodedImage | None], stored: dict[str, Artifacts]
    ) -> None:
        sha_by_check = {check.id: _sha_of(check, images[check.id]) for check in todo}
        unique = {sha: images[check_id] for check_id, sha in sha_by_check.items()}  # same bytes twice: once
        versions = self.detector.artifact_versions
        known = {sha: stored[sha] for sha in unique if sha in stored}
        with self.ledger.session() as session:
            known |= self.ledger.load_artifacts(session, [sha for sha in unique if sha not in known], versions)
        _count_reuse(known, list(unique))
        by_sha = once_per_image(self._detect, unique, known)
        with self.ledger.session() as session:  # one transaction: artifacts and results land together
            for sha, image in unique.items():
                if image is not None:
                    self.ledger.upsert_image(session, image)
                new = {kind: key for kind, key in versions.items() if codec.get_field(known[sha], kind) is None}
                self.ledger.save_artifacts(session, sha, by_sha[sha].artifacts, new)  # what was loaded is stored
            for check in todo:
                self._done(session, check, _result_of_detection(by_sha[sha_by_check[check.id]], sha_by_check[check.id]))
        for detection in by_sha.values():
            metrics.stage_times(detection.timings_ms)
            metrics.stage_runs(detection.computed)
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
            if self._finished(session, self.ledger.finish_rejected(session, check.id, error.code, error.message)):
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
        self.enqueue(_message(check), delay, queue_of(check))

    def _done(self, session, check: CheckRow, result: dict) -> None:
        if self._finished(session, self.ledger.finish_done(session, check.id, **result)):
            metrics.finished("done", None, check.created_at)
            metrics.scored(self.version_id, result["p_fake"], result["verdict"] == "fake")
            log.info("check done: %s %.3f", result["verdict"], result["p_fake"], extra=_about(check, "store"))

    def _failed(self, check: CheckRow, code: str, message: str, stage: str) -> None:
        with self.ledger.session() as session:
            if self._finished(session, self.ledger.finish_failed(session, check.id, code, message)):
                metrics.finished("failed", code, check.created_at)
                log.warning("check failed: %s", message, extra=_about(check, stage, code=code))

    def _finished(self, session, row: CheckRow | None) -> CheckRow | None:
        """A check just ended (row is None if it had ended before): its result is queued for delivery, in the
        same transaction, so a stored outcome always has its deliveries."""
        if row is not None:
            outbox.record_outcome(session, row, results_stream=bool(self.settings.results_stream))
        return row

    def backoff(self, attempts: int) -> float:
        return backoff_s(attempts, self.settings.retry_backoff_s, self.settings.retry_backoff_max_s)

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
            self.enqueue(_message(check), 0.0, queue_of(check))
        return len(stuck)


def _message(check: CheckRow) -> dict:
    return {"external_id": check.external_id, "image": check.source, "check_id": check.id}


def queue_of(check: CheckRow) -> str:
    """Re-scores travel on their own queue, which workers read only when the fresh one is empty."""
    return RESCORE_QUEUE if check.priority == Priority.rescore else CHECK_QUEUE


def _has_features(artifacts: Artifacts | None) -> bool:
    return artifacts is not None and artifacts.features is not None


def _sha_of(check: CheckRow, image: DecodedImage | None) -> str:
    return image.sha256 if image is not None else check.image_sha256


def _about(check: CheckRow, stage: str, **fields) -> dict:
    """The `extra` of every log line about a check: which check, for which upload, at which stage."""
    return {"check_id": check.id, "external_id": check.external_id, "stage": stage, **fields}


def _count_reuse(known: dict, shas: list[str]) -> None:
    for sha in shas:
        artifacts = known.get(sha)
        for artifact in ("caption", "objects", "embeddings", "features"):
            hit = artifacts is not None and getattr(artifacts, artifact) is not None
            metrics.ARTIFACT_REUSE.labels(artifact, "hit" if hit else "miss").inc()


def _result_of(done: CheckRow) -> dict:
    fields = ("image_sha256", "p_fake", "verdict", "threshold", "caption", "objects", "object_count")
    return {field: getattr(done, field) for field in fields}


def _result_of_detection(d, sha256: str) -> dict:
    as_dict = d.to_dict()
    return {
        "image_sha256": sha256,
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
