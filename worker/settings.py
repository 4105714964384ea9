"""One typed settings object, read from `ITEM_`-prefixed environment variables (and a `.env` file).

With nothing set, everything runs embedded on this machine: models under the user cache, a SQLite ledger in
a local file, in-process execution. Given a broker and a database URL, the same commands use Redis and
Postgres. Command-line options override these values for one run; the Celery config is derived from here.

A process builds its settings once, at start-up (`load_settings`, which `item` commands call with their
options), and hands that object on; nothing builds settings at import, so a bad value is one clear error
naming its variable, not a traceback from deep inside an import.

A list is written as an operator would write it, `ITEM_FETCH_ALLOWED_NETWORKS=10.1.0.0/16,10.2.0.0/16`, or as
JSON, `["10.1.0.0/16"]`: both are read, and nothing in a list is left for its user to find wrong later (networks
are parsed, host names checked, here).
"""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path
from typing import Annotated, Literal, get_origin

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from pydantic_settings import SettingsError as UndecodableSetting

from pipeline.core.defaults import (
    DEFAULT_FEATURE_DIR,
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
    DEFAULT_MODEL_DIR,
    PRECISIONS,
)
from pipeline.core.errors import ItemError
from worker.sources.addresses import host_pattern, network_text

DATA_HOME = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "item"
DEFAULT_DATABASE_URL = f"sqlite:///{DATA_HOME / 'ledger.sqlite3'}"
CHECK_QUEUE = "item.checks"
CHECK_TASK = "item.check"
ARTIFACT_KINDS = ("caption", "ground", "embed", "features", "provenance")  # as `pipeline.core.codec.FIELDS` names
# What a later re-score needs: a new head reads the features, a new CLIP the caption and boxes, a new grounder the
# caption, and every one the provenance (else the image is read again). The CLIP embeddings serve only a change of
# the misalignment rule, and are the largest by far.
DEFAULT_STORED_ARTIFACTS = ("caption", "ground", "features", "provenance")

# pydantic-settings would json.loads a list-valued variable before any validator ran, and a plain
# `10.1.0.0/16` would end every command in a traceback: NoDecode hands the text to `_split_list` instead.
TextList = Annotated[list[str], NoDecode]
PathList = Annotated[list[Path], NoDecode]


def backoff_s(attempts: int, first_s: float, max_s: float) -> float:
    """Seconds to wait after the `attempts`-th try: doubling from `first_s`, capped at `max_s`, ×0.5–1.5 jitter.

    The jitter spreads out retries that failed together (a receiver or store that went down for everyone).
    """
    return min(max_s, first_s * 2 ** max(0, attempts - 1)) * random.uniform(0.5, 1.5)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ITEM_", env_nested_delimiter="__", env_file=".env", extra="ignore")

    # models
    profile: str = Field("paper", description="Model profile: paper, small, tiny, paper-random or small-random.")
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="Where model folders live (and are downloaded to).")
    feature_dir: Path = Field(
        DEFAULT_FEATURE_DIR, description="Cache of dataset artifacts for `item features|train|eval|calibrate`."
    )
    allow_download: bool = Field(True, description="Fetch missing models from the Hugging Face hub.")
    head: Path | None = Field(None, description="Head weights (.safetensors) used to score.")
    device: str = Field(
        "auto",
        description="Where the models run: auto (CUDA when present, else cpu), cpu, cuda, cuda:N, or, for the GPU "
        "loops of `item worker`, a list such as cuda:0,cuda:2. auto and cuda give the worker's loop i the GPU cuda:i "
        "and refuse more loops than GPUs; a list gives loop i its i-th entry; one named device (cuda:1, cpu) is "
        "shared by every loop.",
    )
    stage_precision: dict[str, str] = Field(
        default_factory=dict,
        description='Per-stage precision over the profile\'s, e.g. {"ground": "bf16", "embed": "tf32"}: fp32, tf32, '
        "bf16 or fp16 (a new stage version: outputs change).",
    )

    simulated_device_ms: dict[str, float] = Field(
        default_factory=dict,
        description="The `sim` profile only (a benchmark instrument: it scores nothing): milliseconds its simulated "
        'device is held per image and stage, over the defaults (README, "Keeping a GPU busy"), e.g. '
        '{"caption": 2.46, "ground": 2.0, "embed_image": 0.41, "embed_text": 0.03}.',
    )
    prepare_ahead: str = Field(
        "auto",
        description="Prepare the models' inputs (downscale, each stage's resize, pixel copies) of the next batch on "
        "the prefetch thread while the models run this one (on), or on the model thread (off); auto: on when the "
        "models run on a GPU (or the simulated device), off when they run on the CPU, where both would share its "
        "cores.",
    )

    # inputs
    batch_size: int = Field(8, ge=1, le=512, description="Images per model batch.")
    max_pixels: int = Field(
        DEFAULT_MAX_PIXELS, ge=1, le=89_478_485, description="Largest image accepted, in pixels (Pillow caps it)."
    )
    max_image_bytes: int = Field(DEFAULT_MAX_BYTES, ge=1, description="Largest image file accepted, in bytes.")
    max_b64_bytes: int = Field(8 * 1024 * 1024, ge=1, description="Largest inline (base64) image, decoded bytes.")
    allowed_path_roots: PathList = Field(
        default_factory=list, description="Folders whose files may be checked by `path`; empty refuses all paths."
    )
    fetch_timeout_s: float = Field(10.0, gt=0, description="Whole-download time limit for image URLs.")
    fetch_concurrency: int = Field(
        32, ge=1, le=256, description="Images a worker reads at once (URLs, S3, files): downloads wait on the network."
    )
    fetch_per_host: int = Field(
        16, ge=1, le=256, description="Of those, at most this many from one host, so one slow server cannot take all."
    )
    fetch_max_redirects: int = Field(3, ge=0, le=10, description="Redirects followed (each one re-checked).")
    fetch_allowed_networks: TextList = Field(
        default_factory=list,
        description="Networks exempt from the private-address refusal (an internal image CDN, say), as CIDRs.",
    )
    fetch_allowed_hosts: TextList = Field(
        default_factory=list,
        description="Host names exempt from the private-address refusal (cdn.internal, or *.cdn.internal for its "
        "subdomains), so allowing one image server does not open a whole private network.",
    )
    s3_endpoint_url: str | None = Field(
        None, description="S3-compatible endpoint for `s3` sources (MinIO, Ceph...); unset: AWS's own."
    )
    s3_region: str = Field("us-east-1", description="Region of the S3 sources.")
    s3_access_key_id: str | None = Field(None, description="S3 credentials; unset: boto3's own chain (env, role).")
    s3_secret_access_key: SecretStr | None = Field(None, description="S3 secret key, with s3_access_key_id.")
    s3_allowed_buckets: TextList = Field(
        default_factory=list, description="Buckets checks may read; empty refuses every bucket."
    )

    # animated images and videos (pipeline/core/media.py): sampled into frames, each scored like an image
    video_frames: int = Field(
        8, ge=0, le=64, description="Frames sampled from an animated image or video, evenly over its timeline; "
        "0: an animation is judged by its first frame and a video refused, as before 27.",
    )  # fmt: skip
    video_max_seconds: float = Field(60.0, gt=0, le=3600, description="Longest video or animation, by its timeline.")
    video_max_bytes: int = Field(64 * 2**20, ge=1, description="Largest video or animated file, in bytes.")
    video_decode_timeout_s: float = Field(20.0, gt=0, le=600, description="Time limit of decoding one upload.")
    video_max_decoded_frames: int = Field(
        3000, ge=1, le=1_000_000, description="Frames decoded at most per upload (more: video.too_many_frames)."
    )
    video_flag_frames: int = Field(
        2, ge=1, le=64, description="Frames over the threshold that make a video fake: its p(fake) is its k-th "
        "highest frame's (all of them if it has fewer).",
    )  # fmt: skip
    # near-copies (pipeline/core/pdq.py): PDQ hashes of still images, and the bank of moderators' decisions
    near_duplicates: bool = Field(
        True, description="Answer an image within near_max_distance of one already judged under the version from it."
    )
    near_max_distance: int = Field(15, ge=0, le=23, description="PDQ bits apart that still make a near-copy.")
    bank_max_distance: int = Field(15, ge=0, le=23, description="PDQ bits apart that still match a decision.")

    # provenance (pipeline/core/provenance.py)
    read_provenance: bool = Field(True, description="Read C2PA manifests and XMP DigitalSourceType from each image.")
    c2pa_trust_anchors: Path | None = Field(
        None,
        description="PEM file of the C2PA trust anchors: manifests signed under them are `valid`, others "
        "`untrusted`; unset: none is trusted.",
    )
    provenance_timeout_s: float = Field(
        2.0, gt=0, le=60, description="Time limit of one image's C2PA parse; past it, a provenance error."
    )
    provenance_decides: Literal["off", "trusted", "declared"] = Field(
        "off",
        description="Which declarations of AI generation make the verdict fake whatever the score: off (the "
        "score decides), trusted (a valid C2PA manifest of a trusted signer) or declared (also untrusted ones, XMP).",
    )

    # the service
    database_url: str = Field(DEFAULT_DATABASE_URL, description="Ledger: postgresql+psycopg://... or sqlite:///...")
    database_replica_url: str | None = Field(
        None,
        description="A read-only follower (PostgreSQL hot standby) of the ledger: `item serve` reads lists, check "
        "pages and the operations page from it, except a visitor's reads just after their own write; unset: "
        "everything reads the primary (ops/RUNBOOK.md, Read replica).",
    )
    broker_url: str | None = Field(
        None, description="redis://host:port/db or amqp://user:pass@host:port/vhost; unset runs checks in-process."
    )
    redis_key_prefix: str = Field("", description="Prefix of every Redis key, so deployments can share a Redis.")
    worker_concurrency: int = Field(
        1, ge=0, description="GPU loop processes per `item worker` (one per GPU); 0 runs the intake only."
    )
    batch_max_wait_s: float = Field(0.2, ge=0, description="How long a worker waits to fill a batch.")
    batch_read_wait_s: float = Field(
        1.0,
        gt=0,
        description="How long a batch waits for its downloads (URLs, S3): a check still downloading then leaves the "
        "batch, its download going on, and comes back once it is done (at ITEM_FETCH_TIMEOUT_S or more, never).",
    )
    batch_time_budget_s: float = Field(
        300.0, gt=0, description="Longest a batch of checks may run; its unfinished checks end as check.timeout."
    )
    check_time_budget_s: float | None = Field(
        None, gt=0, description="The old name of batch_time_budget_s (ITEM_CHECK_TIME_BUDGET_S), still read."
    )
    max_attempts: int = Field(5, ge=1, description="Tries before a transiently failing check ends as failed.")
    retry_backoff_s: float = Field(2.0, gt=0, description="First retry delay; doubles per attempt, with jitter.")
    retry_backoff_max_s: float = Field(300.0, gt=0, description="Longest retry delay.")
    lease_s: float = Field(
        15.0, ge=1, description="How long a claim holds checks unrenewed: a dead worker's checks are redone after it."
    )
    idle_poll_s: float = Field(
        2.0, gt=0, description="How long an idle worker waits for a wake-up before it looks in the ledger again."
    )
    activate_on_start: bool = Field(
        False, description="A worker starting on a new version makes it active (else: `item versions activate`)."
    )
    intake_prefetch: int = Field(256, ge=1, le=65_535, description="Messages the intake holds unacknowledged.")
    intake_batch_size: int = Field(64, ge=1, le=4096, description="Messages filed per ledger transaction.")
    intake_threads: int = Field(
        2, ge=1, le=64, description="Threads of a worker filing messages (Celery's pool): transactions in flight."
    )
    quota_backlog_retry_s: int = Field(
        30, ge=1, le=3600, description="Retry-After of a submission refused for its tenant's backlog cap."
    )
    tenant_refresh_s: float = Field(
        30.0, gt=0, le=3600, description="How often a worker's intake looks for new tenants, to consume their queues."
    )
    intake_visibility_timeout_s: float = Field(
        15.0,
        ge=5,
        description="Redis: an intake message unacknowledged this long (its worker died) goes back to the queue.",
    )
    reconcile_after_s: float = Field(
        900.0, gt=0, description="An unfinished check no worker moved for this long counts as stuck."
    )
    reconcile_interval_s: float = Field(60.0, gt=0, description="How often the deployment's reconciler runs.")
    store_artifacts: TextList = Field(
        default_factory=lambda: list(DEFAULT_STORED_ARTIFACTS),
        description="What a check keeps of its image for later re-scores: caption, ground (the boxes), features, "
        "embed (the CLIP vectors: needed only to re-score a change of the misalignment rule, and large).",
    )
    rescore_batch_size: int = Field(
        64, ge=1, le=4096, description="Checks per batch when re-scoring (stored artifacts make them cheap)."
    )

    # result delivery
    callback_secret: SecretStr | None = Field(
        None,
        description="The default tenant's unnamed callback secret (HMAC-SHA256); other tenants' are in the ledger.",
    )
    callback_rotation_window_s: float = Field(
        86_400, ge=0, le=90 * 86_400, description="How long `item secrets rotate` keeps the old secret signing."
    )
    callback_timeout_s: float = Field(5.0, gt=0, description="Whole-request time limit of one callback POST.")
    callback_allowed_networks: TextList = Field(
        default_factory=list, description="Networks exempt from the private-address refusal for callbacks (CIDRs)."
    )
    results_stream: str | None = Field(
        None, description="Redis stream every result is added to (XADD), e.g. item:results; unset: none."
    )
    results_stream_url: str | None = Field(None, description="Redis of the results stream; unset: the broker's.")
    results_stream_maxlen: int | None = Field(
        None, ge=1, description="Optional ceiling on the stream's length (approximate), beside its retention."
    )
    # Connections at fleet size (PgBouncer) and how long results stay on the stream (ops/RUNBOOK.md, Scaling).
    database_session_url: str | None = Field(
        None,
        description="A direct (or session-pooled) PostgreSQL URL for what needs one session for long: the LISTEN "
        "wake-ups and the reconciler's advisory lock; unset: ITEM_DATABASE_URL. Set it when ITEM_DATABASE_URL "
        "points at PgBouncer in transaction mode.",
    )
    results_stream_retention_s: float = Field(
        24 * 3600.0,
        gt=0,
        description="How long results stay on the stream: each XADD trims entries older than this (MINID ~).",
    )
    delivery_max_attempts: int = Field(
        15, ge=1, description="Tries before a delivery is recorded as failed (15: about an hour of retrying)."
    )
    delivery_backoff_s: float = Field(2.0, gt=0, description="First delivery retry delay; doubles per attempt.")
    delivery_backoff_max_s: float = Field(600.0, gt=0, description="Longest delivery retry delay.")
    delivery_poll_s: float = Field(1.0, gt=0, description="How often a worker looks for deliveries that are due.")

    # the HTTP API and console (`item serve`)
    http_addr: str = Field("127.0.0.1", description="Address `item serve` listens on.")
    http_port: int = Field(8000, ge=0, le=65535, description="Port of `item serve`.")
    console_session_hours: float = Field(12.0, gt=0, le=24 * 30, description="How long a console sign-in lasts.")
    thumbnail_max_side: int = Field(
        256, ge=0, le=1024, description="Longest side of the thumbnail a worker keeps of each image; 0 keeps none."
    )
    thumbnail_retention_days: float = Field(
        30.0, gt=0, description="How long thumbnails are kept (the reconciler deletes older ones)."
    )
    review_lease_s: float = Field(300.0, ge=10, le=86400, description="Seconds a moderator holds a review item.")
    review_double_share: float = Field(0.05, ge=0, le=1, description="Share of review items two moderators review.")
    retain_reviews_days: int | None = Field(
        None, ge=1, description="Days an unreviewed item stays queued (30; never past ITEM_RETAIN_CHECKS_DAYS)."
    )

    # retention: what the ledger keeps, by kind, in whole UTC days (`item db maintain`, and every
    # maintain_interval_s in the deployment's reconciler). On PostgreSQL a day goes as one partition.
    retain_checks_days: int = Field(
        90, ge=1, description="Days a check (the audit trail) is kept; older days are exported to archive_dir first."
    )
    archive_dir: Path | None = Field(
        None,
        description="Folder checks are exported to (gzip JSON Lines, a file per day) before their day is dropped; "
        "unset: checks are never dropped.",
    )
    retain_keys_days: int = Field(
        7, ge=1, description="Idempotency window: a resent external id within it gets its first check back."
    )
    retain_blobs_days: int = Field(
        7, ge=1, description="Days inline (base64) image bytes are kept: a check re-runs or re-scores from them."
    )
    retain_artifacts_days: int = Field(
        30, ge=1, description="Days stage outputs (captions, boxes, features) are kept for cheap re-scores."
    )
    retain_images_days: int = Field(30, ge=1, description="Days what was decoded of each image is kept.")
    retain_deliveries_days: int = Field(7, ge=1, description="Days a delivery (a result's outbox row) is kept.")
    retain_dead_letters_days: int = Field(14, ge=1, description="Days a dead letter is kept.")
    partitions_ahead_days: int = Field(
        3, ge=1, le=60, description="PostgreSQL: days of partitions made ahead of time, so no insert waits for one."
    )
    maintain_interval_s: float = Field(
        3600.0, gt=0, description="How often the reconciler makes partitions ahead and drops expired days."
    )

    # operations
    metrics_port: int = Field(9808, ge=0, le=65535, description="Port of the /metrics endpoint of `item worker`.")
    metrics_addr: str = Field(
        "127.0.0.1",
        description="Address the metrics endpoint listens on: loopback unless set (0.0.0.0 in a container whose "
        "port is published to Prometheus), as the metrics name pipeline versions and queue depths.",
    )
    metrics_dir: Path | None = Field(None, description="Folder for the worker processes' metric files.")
    metrics_tenants: int = Field(
        20, ge=1, le=1000, description="Tenant label values of the metrics: `default` and the heaviest others; the "
        "rest are `other` (Prometheus' series stay bounded however many tenants there are).",
    )  # fmt: skip
    log_format: str = Field("json", pattern="^(json|text)$", description="Worker log lines: json or text.")

    @property
    def session_database_url(self) -> str:
        """Where the LISTEN wake-ups and the advisory lock connect: never through a transaction pooler."""
        return self.database_session_url or self.database_url

    @field_validator("*", mode="before")
    @classmethod
    def _split_list(cls, value, info: ValidationInfo):
        # Every list field, a new one too (it needs only its NoDecode type: TextList, PathList).
        if get_origin(cls.model_fields[info.field_name].annotation) is list:
            return split_list(value)
        return value

    @field_validator("fetch_allowed_networks", "callback_allowed_networks")
    @classmethod
    def _networks(cls, networks: list[str]) -> list[str]:
        return [network_text(network) for network in networks]

    @field_validator("fetch_allowed_hosts")
    @classmethod
    def _hosts(cls, hosts: list[str]) -> list[str]:
        return [host_pattern(host) for host in hosts]

    # Checked here, not in `_consistent`, so the error names the variable that holds the bad value.
    @field_validator("store_artifacts")
    @classmethod
    def _artifact_kinds(cls, kinds: list[str]) -> list[str]:
        unknown = sorted(set(kinds) - set(ARTIFACT_KINDS))
        if unknown:
            raise ValueError(f"{', '.join(unknown)} not among {', '.join(ARTIFACT_KINDS)}")
        return kinds

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        from worker.gpu.placement import device_entries  # torch-free: whether the GPUs are there is the loops' check

        return ",".join(device_entries(device))

    @field_validator("stage_precision")
    @classmethod
    def _stage_precisions(cls, precisions: dict[str, str]) -> dict[str, str]:
        for stage, precision in precisions.items():
            if stage not in ("caption", "ground", "embed") or precision not in PRECISIONS:
                raise ValueError(
                    f"{stage}={precision} is not a stage (caption, ground, embed) with a precision "
                    f"({', '.join(PRECISIONS)})"
                )
        return precisions

    @field_validator("prepare_ahead", mode="before")
    @classmethod
    def _prepare_ahead(cls, value) -> str:
        text = str(value).strip().lower()
        choice = {"true": "on", "1": "on", "yes": "on", "false": "off", "0": "off", "no": "off"}.get(text, text)
        if choice not in ("auto", "on", "off"):
            raise ValueError(f"{value!r}: expected auto, on or off")
        return choice

    @field_validator("simulated_device_ms")
    @classmethod
    def _simulated_times(cls, times: dict[str, float]) -> dict[str, float]:
        from pipeline.core.simulated import DEVICE_MS  # torch-free: the stages' names and default times

        for part, ms in times.items():
            if part not in DEVICE_MS or not 0 <= ms <= 10_000:
                raise ValueError(f"{part}={ms}: expected one of {', '.join(DEVICE_MS)} with 0 to 10000 ms")
        return times

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        self._take_old_budget_name()
        # A running check's heartbeat touches it every third of a lease: one untouched for longer is not moving.
        if self.reconcile_after_s <= self.lease_s:
            raise ValueError("reconcile_after_s must be longer than lease_s")
        # A key must not outlive its check: a resent id would be answered with a check that is gone.
        if self.retain_keys_days > self.retain_checks_days:
            raise ValueError("retain_keys_days must not be longer than retain_checks_days")
        if self.provenance_decides != "off" and not self.read_provenance:
            raise ValueError(f"provenance_decides={self.provenance_decides} needs read_provenance")
        if self.provenance_decides == "trusted" and self.c2pa_trust_anchors is None:
            raise ValueError("provenance_decides=trusted needs c2pa_trust_anchors: without them no signer is trusted")
        return self

    def _take_old_budget_name(self) -> None:
        """ITEM_CHECK_TIME_BUDGET_S still sets the budget (it always bounded a batch, not one check)."""
        old = self.check_time_budget_s
        if old is None:
            return
        if "batch_time_budget_s" in self.model_fields_set and self.batch_time_budget_s != old:
            raise ValueError(
                "batch_time_budget_s and its old name check_time_budget_s are both set, to different values: "
                "set only ITEM_BATCH_TIME_BUDGET_S"
            )
        self.batch_time_budget_s = old


def split_list(value):
    """A list as written in the environment: JSON (`["a", "b"]`) or comma-separated (`a, b`); other values as given.

    Items are trimmed and empty ones dropped, so `a,,b ,` is `["a", "b"]` and an empty variable an empty list.
    """
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):  # no name, bucket, network or path in these lists starts with a bracket
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"not a JSON list ({error}); or write the items separated by commas") from None
    return [item.strip() for item in text.split(",") if item.strip()]


class SettingsError(ItemError):
    """A setting has a value it cannot take. Nothing can run until it is fixed."""

    code = "settings.invalid"


def load_settings(**overrides) -> Settings:
    """The settings of this process: ITEM_* variables and `.env`, then `overrides` (None means not given)."""
    try:
        return Settings(**{key: value for key, value in overrides.items() if value is not None})
    except ValidationError as error:
        raise SettingsError(_explained(error)) from None
    except UndecodableSetting as error:  # a JSON-valued variable (stage_precision) that is not JSON
        raise SettingsError(_undecodable(error)) from None


def _explained(error: ValidationError) -> str:
    """One line per bad value, naming the environment variable a person would set."""
    lines = []
    for problem in error.errors(include_url=False):
        message = problem["msg"].removeprefix("Value error, ")
        if problem["loc"]:
            name = f"ITEM_{str(problem['loc'][0]).upper()}"
            lines.append(f"{name}={_shown(problem.get('input'))}: {message}")
        else:
            lines.append(message)
    return "Invalid settings: " + "; ".join(lines)


def _undecodable(error: UndecodableSetting) -> str:
    """pydantic-settings names the field in prose (`error parsing value for field "x" from source ...`) and keeps
    the JSON error as the cause: one line naming the variable, as `_explained` writes them."""
    field = re.search(r'field "(\w+)"', str(error))
    if field is None:
        return f"Invalid settings: {error}"
    why = f" ({error.__cause__})" if error.__cause__ is not None else ""
    return f"Invalid settings: ITEM_{field.group(1).upper()}: not valid JSON{why}"


def _shown(value) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
