"""What a batch of checks goes through, as plain functions over the ledger and the detector (no broker here).

A worker claims up to `batch_size` ready checks of its pipeline version from the ledger under a lease (see
`worker.loop`), and this runs them: stored answers and artifacts first, then fetching and decoding, the models
once per distinct image, and one transaction for artifacts, results and outbox rows. Every change to a check
names the lease token, so a worker that lost its lease (it stalled, another took over) can never overwrite
the new owner's work. Metrics and logs of an outcome are emitted only once its transaction has committed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session

from pipeline.core import codec
from pipeline.core.batches import Reader, once_per_image
from pipeline.core.detector import Detector
from pipeline.core.devices import free_gpu_memory, is_out_of_memory
from pipeline.core.errors import ItemError
from pipeline.core.imaging import DecodedImage
from pipeline.core.results import Artifacts
from worker import metrics, sources
from worker.ledger import outbox
from worker.ledger.models import CheckRow, utcnow
from worker.ledger.states import Priority
from worker.ledger.store import Lease, Ledger
from worker.settings import Settings, backoff_s

log = logging.getLogger("item.worker")

# The ledger is unreachable: nothing can be recorded. Only connection-level errors: a programming error tried
# again would just fail again, forever.
INFRASTRUCTURE_ERRORS = (OperationalError, InterfaceError, ConnectionError, TimeoutError)
TIMEOUT_MESSAGE = "The check's batch ran past its time budget (ITEM_BATCH_TIME_BUDGET_S)."


class TransientError(ItemError):
    """Worth trying again later: the same input may well succeed (timeouts, 5xx, out of memory)."""

    permanent = False


class BatchTimeout(BaseException):  # noqa: N818  (not an Exception: model code's `except Exception` must not eat it)
    """Raised into the loop's thread when a batch runs past its budget, wherever it is, the models included."""


@dataclass
class _Outcomes:
    """Outcomes written in one transaction, reported (metrics, logs) only after it committed."""

    version_id: str
    items: list[tuple] = field(default_factory=list)

    def add(self, status: str, check: CheckRow, stage: str, code: str | None = None, text: str = "", **more) -> None:
        self.items.append((status, check, stage, code, text, more))

    def report(self) -> None:
        for status, check, stage, code, text, more in self.items:
            about = _about(check, stage, **({"code": code} if code else {}))
            if status == "retried":
                metrics.RETRIES.labels(code).inc()
                log.info("check retried in %.1fs: %s", more["delay"], text, extra=about)
                continue
            metrics.finished(status, code, check.created_at)
            if status == "done":
                metrics.scored(self.version_id, check.p_fake, check.verdict == "fake")
                log.info("check done: %s %.3f", check.verdict, check.p_fake, extra=about)
            elif status == "rejected":
                log.info("check rejected: %s", text, extra=about)
            else:
                log.warning("check failed: %s", text, extra=about)


@dataclass
class CheckService:
    settings: Settings
    ledger: Ledger
    detector: Detector
    reader: Reader = field(init=False)  # fetches and decodes a batch's images a few at a time

    def __post_init__(self) -> None:
        self.reader = Reader(max_pixels=self.settings.max_pixels, max_bytes=self.settings.max_image_bytes)

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
            claimed += self.claim(lease, size - len(claimed), Priority.fresh)
        if claimed:
            metrics.claimed(len(claimed), [row.enqueued_at or row.created_at for row in claimed])
        return claimed

    # ------------------------------------------------------------------ running

    def run_batch(self, batch: list[CheckRow], lease: Lease) -> None:
        """Answers what stored results and artifacts can, decodes the rest, runs the models, stores everything.

        A check whose bytes were seen before (a re-score) skips decoding, and even fetching, when its features are
        stored under this pipeline's stages: only the head runs for it.
        """
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
                self.fail([one.item], one.error, lease, stage="decode")
        ready = [check for check in batch if check.id in images]
        todo = self._answer_known_bytes(ready, {c.id: _sha_of(c, images[c.id]) for c in ready}, lease)
        pixels = len({images[c.id].sha256 for c in todo if images[c.id] is not None})
        # One line per batch, in a fixed shape: operators grep it, and the tests count model runs with it.
        log.info("batch checks=%d model_images=%d undecodable=%d", len(batch), pixels, len(batch) - len(ready))
        if not todo:
            return
        try:
            self._detect_and_store(todo, images, stored, lease)
        except INFRASTRUCTURE_ERRORS:
            raise  # the ledger is unreachable: nothing to record; the lease runs out and the checks are retried
        except ItemError as error:
            self.fail(todo, error, lease, stage="models")
        except Exception as error:  # a bug or a model crash: retried, and failed once attempts run out
            log.exception("batch of %d checks crashed", len(todo))
            self.fail(todo, TransientError(f"Internal error: {error!r}", code="check.internal_error"), lease, "models")

    def time_out(self, batch: list[CheckRow], lease: Lease) -> None:
        """The batch ran past its budget: each check still held is retried as `check.timeout` (or failed)."""
        self.fail(batch, TransientError(TIMEOUT_MESSAGE, code="check.timeout"), lease, stage="batch")

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

    def _answer_known_bytes(self, batch: list[CheckRow], sha_by_check: dict[str, str], lease: Lease) -> list[CheckRow]:
        """Bytes already checked under this pipeline version get that answer; returns the checks still to run."""
        todo, outcomes = [], _Outcomes(self.version_id)
        with self.ledger.session() as session:
            answers = self.ledger.done_checks_for_images(session, list(sha_by_check.values()), self.version_id)
            for check in batch:
                done = answers.get(sha_by_check[check.id])
                metrics.DUPLICATE_BYTES.labels("miss" if done is None else "hit").inc()
                if done is None:
                    todo.append(check)
                    continue
                self._done(session, check, {**_result_of(done), "timings_ms": {"reused": 0.0}}, lease, outcomes)
        outcomes.report()
        return todo

    def _detect_and_store(
        self, todo: list[CheckRow], images: dict[str, DecodedImage | None], stored: dict[str, Artifacts], lease: Lease
    ) -> None:
        sha_by_check = {check.id: _sha_of(check, images[check.id]) for check in todo}
        unique = {sha: images[check_id] for check_id, sha in sha_by_check.items()}  # same bytes twice: once
        versions = self.detector.artifact_versions
        known = {sha: stored[sha] for sha in unique if sha in stored}
        with self.ledger.session() as session:
            known |= self.ledger.load_artifacts(session, [sha for sha in unique if sha not in known], versions)
        _count_reuse(known, list(unique))
        by_sha = once_per_image(self._detect, unique, known)
        outcomes = _Outcomes(self.version_id)
        with self.ledger.session() as session:  # one transaction: artifacts and results land together
            for sha, image in unique.items():
                if image is not None:
                    self.ledger.upsert_image(session, image)
                new = {kind: key for kind, key in versions.items() if codec.get_field(known[sha], kind) is None}
                self.ledger.save_artifacts(session, sha, by_sha[sha].artifacts, new)  # what was loaded is stored
            for check in todo:
                result = _result_of_detection(by_sha[sha_by_check[check.id]], sha_by_check[check.id])
                self._done(session, check, result, lease, outcomes)
        outcomes.report()
        for detection in by_sha.values():
            metrics.stage_times(detection.timings_ms)
            metrics.stage_runs(detection.computed)
        metrics.gpu_memory()

    def _detect(self, images: list[DecodedImage], known: list) -> list:
        """Runs the models. Each stage halves its own runs when the GPU runs out of memory; what still runs out
        (one image too large for a stage, or memory outside the stages) halves the batch of checks."""
        try:
            return self.detector.detect(images, known)
        except Exception as error:
            if not is_out_of_memory(error):
                raise
            if len(images) == 1:
                raise TransientError(
                    "The GPU ran out of memory on a single image.", code="gpu.out_of_memory"
                ) from error
            free_gpu_memory()
            half = len(images) // 2
            return self._detect(images[:half], known[:half]) + self._detect(images[half:], known[half:])

    # ------------------------------------------------------------------ outcomes

    def fail(self, checks: list[CheckRow], error: ItemError, lease: Lease, stage: str) -> None:
        """Ends `checks` for `error` in one transaction: rejected if it is permanent; else retried with backoff
        and jitter, or failed once attempts are used up. Checks this lease no longer holds are left alone."""
        outcomes = _Outcomes(self.version_id)
        with self.ledger.session() as session:
            for check in checks:
                self._fail_one(session, check, error, lease, stage, outcomes)
        outcomes.report()

    def _fail_one(self, session: Session, check: CheckRow, error: ItemError, lease: Lease, stage: str, outcomes):
        code, message = error.code, error.message
        if error.permanent:
            if self._finished(session, self.ledger.finish_rejected(session, check.id, code, message, lease.token)):
                outcomes.add("rejected", check, stage, code, message)
            return
        if check.attempts >= self.settings.max_attempts:
            if self._finished(session, self.ledger.finish_failed(session, check.id, code, message, lease.token)):
                outcomes.add("failed", check, stage, code, message)
            return
        delay = self.backoff(check.attempts)
        available_at = utcnow() + timedelta(seconds=delay)
        if self.ledger.mark_queued(
            session, check.id, lease.token, available_at=available_at, error_code=code, error_message=message
        ):
            outcomes.add("retried", check, stage, code, message, delay=delay)

    def _done(self, session: Session, check: CheckRow, result: dict, lease: Lease, outcomes: _Outcomes) -> None:
        row = self._finished(session, self.ledger.finish_done(session, check.id, lease.token, **result))
        if row is not None:
            outcomes.add("done", row, "store")

    def _finished(self, session: Session, row: CheckRow | None) -> CheckRow | None:
        """A check just ended (row is None if this lease no longer held it): its result is queued for delivery in
        the same transaction, so a stored outcome always has its deliveries."""
        if row is not None:
            outbox.record_outcome(session, row, results_stream=bool(self.settings.results_stream))
        return row

    def backoff(self, attempts: int) -> float:
        return backoff_s(attempts, self.settings.retry_backoff_s, self.settings.retry_backoff_max_s)


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
