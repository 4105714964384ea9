"""Prometheus metrics: every metric defined once, here, and summed over a worker's processes at scrape time.

Worker processes write their samples to files in `PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess
mode); the exporter that `item worker` (or `item metrics`) runs aggregates every process's files at scrape time,
and adds what is read fresh at scrape (queue depth, stuck checks). No label holds an id, URL or hash: the
`pipeline_version` label is the short version id, of which a deployment has a handful. The `tenant` label is
written with the tenant's id here and bounded where it is exposed: ITEM_METRICS_TENANTS values at most, every
other tenant summed as `other` (worker.ops.tenant_labels).
"""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import Counter, Gauge, Histogram

from worker import codes

DEFAULT_TENANT = "default"  # worker.ledger.models.DEFAULT_TENANT, without importing the ledger here

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STAGE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
SCORE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))

CHECKS = Counter(
    "item_checks_total", "Checks that reached a final status, by status, error code and tenant.",
    ["status", "code", "tenant"],
)  # fmt: skip
CHECKS_FILED = Counter("item_checks_filed_total", "Checks the intake filed (queued), by tenant.", ["tenant"])
QUOTA_REFUSED = Counter(
    "item_quota_refused_total",
    "Submissions over their tenant's quota (HTTP 429, or `rejected` over the broker), by tenant and limit: rate "
    "(quota.exceeded) or backlog (quota.backlog).",
    ["tenant", "reason"],
)
RETRIES = Counter("item_retries_total", "Checks sent back to the queue to be tried again, by error code.", ["code"])
FETCH_DEFERRED = Counter(
    "item_fetch_deferred_total",
    "Checks that left their batch because their bytes were not there in time (ITEM_BATCH_READ_WAIT_S), sent back "
    "without using an attempt: their download still running (downloading), or no download slot free (waiting).",
    ["reason"],
)
STAGE_SECONDS = Histogram(
    "item_stage_seconds",
    "Time per image in each pipeline stage (a batch's time shared by its images).",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
CHECK_LATENCY = Histogram(
    "item_check_latency_seconds", "From submission to result, for checks that finished.", buckets=LATENCY_BUCKETS
)
QUEUE_WAIT = Histogram(
    "item_queue_wait_seconds", "From (re-)queueing to being claimed by a worker.", buckets=LATENCY_BUCKETS
)
DEVICE_BUSY = Counter(
    "item_device_busy_seconds_total",
    "Seconds each GPU loop's device ran models (the model thread's time in them; the simulated device's time held). "
    "Its rate is the device's busy share.",
    ["device"],
)
BATCH_SIZE = Histogram("item_batch_size", "Checks per claimed batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128))
MODEL_LOAD_SECONDS = Gauge(
    "item_model_load_seconds", "How long each stage's model took to load.", ["stage"], multiprocess_mode="max"
)
ARTIFACT_REUSE = Counter(
    "item_artifact_reuse_total",
    "Stored artifacts found (hit) or computed (miss), per artifact.",
    ["artifact", "outcome"],
)
STAGE_IMAGES = Counter(
    "item_stage_images_total",
    "Images each model stage actually ran on (stored artifacts spare the rest), per stage.",
    ["stage"],
)
DELIVERIES = Counter(
    "item_deliveries_total",
    "Result deliveries attempted, per target kind (callback, stream) and outcome (delivered, retried, failed).",
    ["target", "outcome"],
)
DUPLICATE_BYTES = Counter(
    "item_duplicate_bytes_total",
    "Images whose bytes were already checked under the same pipeline version.",
    ["outcome"],
)
NEAR_COPIES = Counter(
    "item_near_copies_total",
    "Finished checks answered from a near-copy judged before (reused), or whose verdict a moderator's banked "
    "decision set (bank_fake, bank_real).",
    ["outcome"],
)
FRAMES_SCORED = Counter(
    "item_video_frames_total", "Frames of finished videos and animations, per kind of upload.", ["kind"]
)
SCORES = Histogram(
    "item_score",
    "P(AI-generated) of finished checks, per pipeline version.",
    ["pipeline_version"],
    buckets=SCORE_BUCKETS,
)
FLAGGED = Counter(
    "item_flagged_total",
    "Finished checks judged fake or uncertain, per pipeline version and verdict (real ones are not counted).",
    ["pipeline_version", "verdict"],
)
PROVENANCE = Counter(
    "item_provenance_total",
    "Finished checks whose image holds C2PA or XMP provenance, by source and what it says: valid, untrusted or "
    "invalid manifests, XMP that declares AI generation or not.",
    ["source", "state"],
)
PROVENANCE_ERRORS = Counter(
    "item_provenance_errors_total", "Provenance that could not be read (the image was scored all the same).", ["code"]
)
DEAD_LETTERS = Counter(
    "item_dead_letters_total", "Messages the intake could not file as a check (`item deadletters`).", ["code"]
)
WORKER_READY = Gauge(
    "item_worker_ready",
    "GPU loop processes with their models loaded; 0 while any long-lived part of the worker is dead.",
    multiprocess_mode="livesum",
)
GPU_LOOPS = Gauge(
    "item_gpu_loops",
    "GPU loop processes this worker runs (ITEM_WORKER_CONCURRENCY; 0: an intake or maintenance worker).",
    multiprocess_mode="livesum",
)
THREAD_DEATHS = Counter(
    "item_thread_deaths_total",
    "Long-lived threads that crashed (or ended unasked), by thread: each is restarted or its process replaced.",
    ["thread"],
)
# The supervised threads (worker.ops.supervise), by part: the thread is named item-<part>; and a batch's heartbeat
# (worker.gpu.loop.Renewal), whose death is counted but not restarted (its lease runs out).
SUPERVISED_THREADS = (
    "deliverer", "reconciler", "gpu-supervisor", "metrics", "prefetch", "store", "presence", "gpu-state", "watchdog",
    "heartbeat", "tenant-queues",
)  # fmt: skip
GPU_MEMORY = Gauge(
    "item_gpu_memory_bytes", "GPU memory held by torch in worker processes.", ["kind"], multiprocess_mode="livesum"
)
HTTP_REQUESTS = Counter(
    "item_http_requests_total",
    "Requests to `item serve`, by route template (never the path itself), method and status code.",
    ["route", "method", "status"],
)
HTTP_SECONDS = Histogram(
    "item_http_request_seconds", "Time to answer a request to `item serve`, by route template.", ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)  # fmt: skip
AUTH_FAILURES = Counter(
    "item_http_auth_failures_total",
    "Requests refused for their key: missing, malformed, unknown (or revoked), scope (valid key, wrong scope), "
    "session (console sign-in expired or absent), csrf (a form without its token).",
    ["reason"],
)
REPLICA_FALLBACKS = Counter(
    "item_replica_fallbacks_total",
    "Reads of `item serve` meant for the read replica that ran on the primary: unreachable (the replica could not "
    "be reached, or was being left alone after that), not_found (a 404 there, asked again of the primary).",
    ["reason"],
)
# Every series an alert takes increase() of exists from the start at 0: increase() cannot see a series' first sample.
for _target in ("callback", "stream"):
    for _outcome in ("delivered", "retried", "failed"):
        DELIVERIES.labels(_target, _outcome)
CHECKS.labels("done", "", DEFAULT_TENANT)
CHECKS_FILED.labels(DEFAULT_TENANT)
for _code in codes.REJECTED:
    CHECKS.labels("rejected", _code, DEFAULT_TENANT)
for _code in codes.FAILED:
    CHECKS.labels("failed", _code, DEFAULT_TENANT)
    RETRIES.labels(_code)
for _reason in ("rate", "backlog"):
    QUOTA_REFUSED.labels(DEFAULT_TENANT, _reason)
for _reason in ("downloading", "waiting"):
    FETCH_DEFERRED.labels(_reason)
for _code in (*codes.DEAD_LETTER, "message.invalid"):
    DEAD_LETTERS.labels(_code)
for _thread in SUPERVISED_THREADS:
    THREAD_DEATHS.labels(_thread)
for _reason in ("missing", "malformed", "unknown", "scope", "session", "csrf"):
    AUTH_FAILURES.labels(_reason)
for _reason in ("unreachable", "not_found"):
    REPLICA_FALLBACKS.labels(_reason)
for _outcome in ("reused", "bank_fake", "bank_real"):
    NEAR_COPIES.labels(_outcome)
for _kind in ("video", "animation"):
    FRAMES_SCORED.labels(_kind)
for _outcome in ("hit", "miss"):  # so a hit ratio reads 0, not "no data", before the first hit
    DUPLICATE_BYTES.labels(_outcome)
    for _artifact in ("caption", "objects", "embeddings", "features"):
        ARTIFACT_REUSE.labels(_artifact, _outcome)

# Read from the broker and the ledger at scrape time by the exporter (see worker/ops/exporter.py).
QUEUE_DEPTH_NAME = "item_queue_depth"
WAITING_NAME = "item_checks_waiting"
STUCK_NAME = "item_checks_stuck"
THREADS_NAME = "item_worker_threads"

METRIC_NAMES = frozenset(
    {
        "item_checks_total",
        "item_checks_filed_total",
        "item_quota_refused_total",
        "item_retries_total",
        "item_fetch_deferred_total",
        "item_stage_seconds",
        "item_check_latency_seconds",
        "item_queue_wait_seconds",
        "item_batch_size",
        "item_device_busy_seconds_total",
        "item_model_load_seconds",
        "item_artifact_reuse_total",
        "item_stage_images_total",
        "item_deliveries_total",
        "item_duplicate_bytes_total",
        "item_near_copies_total",
        "item_video_frames_total",
        "item_score",
        "item_flagged_total",
        "item_provenance_total",
        "item_provenance_errors_total",
        "item_worker_ready",
        "item_gpu_loops",
        "item_thread_deaths_total",
        "item_gpu_memory_bytes",
        "item_dead_letters_total",
        "item_http_requests_total",
        "item_http_request_seconds",
        "item_http_auth_failures_total",
        "item_replica_fallbacks_total",
        QUEUE_DEPTH_NAME,
        WAITING_NAME,
        STUCK_NAME,
        THREADS_NAME,
    }
)


def finished(status: str, code: str | None, created_at: datetime | None, tenant: str = DEFAULT_TENANT) -> None:
    CHECKS.labels(status, code or "", tenant).inc()
    if created_at is not None:
        CHECK_LATENCY.observe(max(0.0, (datetime.now(UTC) - created_at).total_seconds()))


def scored(pipeline_version: str, p_fake: float, verdict: str | None) -> None:
    SCORES.labels(pipeline_version).observe(p_fake)
    if verdict in ("fake", "uncertain"):
        FLAGGED.labels(pipeline_version, verdict).inc()


def provenance(found: dict | None) -> None:
    """Counts what a finished check's image declared (`Provenance.to_dict()`), and what could not be read."""
    if not found:
        return
    c2pa, xmp = found.get("c2pa") or {}, found.get("xmp") or {}
    if c2pa.get("validation_state"):
        PROVENANCE.labels("c2pa", c2pa["validation_state"]).inc()
    if xmp.get("digital_source_type"):
        PROVENANCE.labels("xmp", "ai" if xmp.get("ai_generated") else "other").inc()
    for error in found.get("errors", []):
        PROVENANCE_ERRORS.labels(error.get("code", "provenance.unknown")).inc()


def claimed(batch_size: int, waited_since: list[datetime | None]) -> None:
    BATCH_SIZE.observe(batch_size)
    now = datetime.now(UTC)
    for moment in waited_since:
        if moment is not None:
            QUEUE_WAIT.observe(max(0.0, (now - moment).total_seconds()))


def stage_times(timings_ms: dict[str, float]) -> None:
    for stage, ms in timings_ms.items():
        if ms > 0:
            STAGE_SECONDS.labels(stage).observe(ms / 1000)


def stage_runs(computed: list[str]) -> None:
    for stage in computed:
        STAGE_IMAGES.labels(stage).inc()


def models_loaded(load_seconds: dict[str, float]) -> None:
    for stage, seconds in load_seconds.items():
        MODEL_LOAD_SECONDS.labels(stage).set(seconds)
    WORKER_READY.set(1)


def gpu_memory() -> None:
    import torch

    if torch.cuda.is_available():
        GPU_MEMORY.labels("allocated").set(torch.cuda.memory_allocated())
        GPU_MEMORY.labels("reserved").set(torch.cuda.memory_reserved())


def artifact_reuse(known: list) -> None:
    """Counts, per image the models run on, which of its artifacts were stored (hit) and which were made (miss)."""
    for artifacts in known:
        for artifact in ("caption", "objects", "embeddings", "features"):
            hit = artifacts is not None and getattr(artifacts, artifact) is not None
            ARTIFACT_REUSE.labels(artifact, "hit" if hit else "miss").inc()


def likeness(check) -> None:
    """Counts what a finished check owes to near-copies and the bank, and the frames a video was judged on."""
    if check.reused_from:
        NEAR_COPIES.labels("reused").inc()
    if check.verdict_reason == "match" and check.match:
        NEAR_COPIES.labels(f"bank_{check.match['label']}").inc()
    if check.media:
        FRAMES_SCORED.labels(check.media["kind"]).inc(len(check.media["frames"]))
