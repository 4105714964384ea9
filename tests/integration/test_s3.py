"""S3 sources against a real S3 server: moto's server mode, started here as its own process on a local port.

moto checks request signatures against the IAM users it knows once its authentication is switched on (after the
test data is in place), so wrong credentials and policies are refused the way S3 refuses them. Checks go through
the real service on both ledgers; the last test goes through `item submit` and an `item worker` process.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from tests.conftest import encode, noise_image
from tests.integration.brokers import free_port
from tests.integration.stack import Worker, make_stack
from worker.gpu.batches import CheckService
from worker.gpu.embedded import InProcess
from worker.intake.filing import CheckRequest
from worker.ledger import reviews
from worker.ledger.store import Lease
from worker.settings import Settings
from worker.sources import s3

BUCKET, PRIVATE = "images", "private"  # the reader may read the first and not the second
IMAGE = encode(noise_image(7))
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Server:
    url: str
    key_id: str  # the reader's credentials, as moto's IAM made them
    secret: str


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_until_answering(url, process, log)
        yield _populate(url)
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _wait_until_answering(url: str, process: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/moto-api/data.json", timeout=1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"moto's S3 server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.05)


def _populate(url: str) -> S3Server:
    """Buckets, objects and a reader with a policy, made before authentication is switched on."""
    admin = {"endpoint_url": url, "region_name": REGION, "aws_access_key_id": "testing"}
    admin["aws_secret_access_key"] = "testing"
    store = boto3.client("s3", config=Config(s3={"addressing_style": "path"}), **admin)
    for bucket in (BUCKET, PRIVATE):
        store.create_bucket(Bucket=bucket)
        store.put_object(Bucket=bucket, Key="cat.png", Body=IMAGE)
    iam = boto3.client("iam", **admin)
    iam.create_user(UserName="reader")
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Effect": "Allow", "Action": "s3:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "s3:*", "Resource": [f"arn:aws:s3:::{PRIVATE}", f"arn:aws:s3:::{PRIVATE}/*"]},
        ],
    }
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    # From now on every request must be signed by a known IAM key and allowed by its policy.
    switch_on = urllib.request.Request(
        f"{url}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(switch_on, timeout=5).close()
    return S3Server(url, key["AccessKeyId"], key["SecretAccessKey"])


def _settings(server: S3Server, **overrides) -> Settings:
    values = {
        "batch_max_wait_s": 0,
        "database_url": "sqlite://",
        "fetch_timeout_s": 5,
        # one batch waits for its object as long as a fetch may take: on a loaded machine (two test processes on
        # two cores) moto can answer after the default 1 s, and the check would leave the batch, still queued
        "batch_read_wait_s": 5,
        "s3_endpoint_url": server.url,
        "s3_region": REGION,
        "s3_access_key_id": server.key_id,
        "s3_secret_access_key": server.secret,
        # every bucket the tests name, so each reaches the store and is answered by it (none is read unless named)
        "s3_allowed_buckets": [BUCKET, PRIVATE, "no-such-bucket"],
    }
    return Settings(**{**values, **overrides})


def _check(ledger, detector, settings: Settings, image: dict):
    """Files one check and runs one batch of it; returns its row, and whether it was sent back to be retried."""
    runner = InProcess(settings, CheckService(settings, ledger, detector))
    [filed] = runner.intake.file([CheckRequest("upload-1", image)])
    lease = Lease.new("test:1", 60)
    runner.service.run_batch(runner.service.claim_batch(lease), lease)
    with ledger.session() as session:
        row = ledger.get_check(session, filed.check.id)
    retried = [row.id] if row.status == "queued" and row.attempts == 1 else []
    return row, retried


def test_an_s3_object_is_checked_and_its_bytes_recorded(s3_server, ledger, tiny_detector):
    row, sent = _check(ledger, tiny_detector, _settings(s3_server), {"s3": f"s3://{BUCKET}/cat.png"})
    assert row.status == "done", (row.error_code, row.error_message)
    assert row.image_sha256 == hashlib.sha256(IMAGE).hexdigest()
    assert row.source == {"s3": {"bucket": BUCKET, "key": "cat.png"}}  # the string form, recorded as the object
    assert sent == []


def test_an_s3_object_gets_a_thumbnail_like_any_other_source(s3_server, ledger, tiny_detector):
    settings = _settings(s3_server, thumbnail_max_side=32)
    row, _ = _check(ledger, tiny_detector, settings, {"s3": f"s3://{BUCKET}/cat.png"})
    assert row.status == "done", (row.error_code, row.error_message)
    with ledger.session() as session:
        thumbnail = reviews.get_thumbnail(session, row.image_sha256)
    assert thumbnail is not None and thumbnail.data.startswith(b"\xff\xd8\xff")
    assert max(thumbnail.width, thumbnail.height) == 32


@pytest.mark.parametrize(
    ("bucket", "key", "overrides", "code"),
    [
        (BUCKET, "no/such/key.png", {}, "source.not_found"),
        ("no-such-bucket", "cat.png", {}, "s3.no_such_bucket"),
        (PRIVATE, "cat.png", {}, "s3.access_denied"),  # the reader's policy denies this bucket
        (BUCKET, "cat.png", {"s3_secret_access_key": "wrong-secret"}, "s3.access_denied"),  # bad signature
        (BUCKET, "cat.png", {"s3_access_key_id": "AKIAUNKNOWN0000000000"}, "s3.access_denied"),  # unknown key id
        # the source's cap is the upload limit, the larger of the image and video limits (kinds.upload_limit)
        (BUCKET, "cat.png", {"max_image_bytes": len(IMAGE) - 1, "video_max_bytes": len(IMAGE) - 1}, "image.too_large"),
        # the endpoint is a closed port: the refusal needed no request, or this would be s3.unavailable
        (BUCKET, "cat.png", {"s3_allowed_buckets": ["other"], "s3_endpoint_url": "CLOSED"}, "s3.bucket_refused"),
        (BUCKET, "cat.png", {"s3_allowed_buckets": [], "s3_endpoint_url": "CLOSED"}, "s3.bucket_refused"),
    ],
)
def test_s3_failures_that_no_retry_can_fix_are_rejected_with_their_code(
    s3_server, ledger, tiny_detector, bucket, key, overrides, code
):
    if overrides.get("s3_endpoint_url") == "CLOSED":
        overrides = {**overrides, "s3_endpoint_url": f"http://127.0.0.1:{free_port()}"}
    settings = _settings(s3_server, **overrides)
    row, sent = _check(ledger, tiny_detector, settings, {"s3": {"bucket": bucket, "key": key}})
    assert (row.status, row.error_code, row.attempts, sent) == ("rejected", code, 1, [])
    assert f"s3://{bucket}/{key}" in row.error_message
    secret = settings.s3_secret_access_key.get_secret_value()
    assert secret not in row.error_message and settings.s3_access_key_id not in row.error_message


def test_no_allowed_bucket_refuses_every_bucket_before_any_request(s3_server):
    # The reader's credentials may read BUCKET; the settings name no bucket, so nothing is read with them.
    settings = _settings(s3_server, s3_allowed_buckets=[], s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    assert Settings().s3_allowed_buckets == []  # the default names none
    with pytest.raises(s3.S3Error) as refused:
        s3.read_object(BUCKET, "cat.png", settings)
    assert refused.value.code == "s3.bucket_refused" and refused.value.permanent
    assert "no bucket may be read" in refused.value.message and "ITEM_S3_ALLOWED_BUCKETS" in refused.value.message


def test_an_object_over_the_limit_is_refused_from_its_size_header(s3_server):
    settings = _settings(s3_server, max_image_bytes=100)
    with pytest.raises(s3.S3Error) as refused:
        s3.read_object(BUCKET, "cat.png", settings)
    # The whole size is only known from the headers: a capped read would have stopped at 101 bytes.
    assert refused.value.code == "image.too_large" and f"{len(IMAGE):,} bytes" in refused.value.message


def test_no_credentials_anywhere_is_rejected(s3_server, ledger, tiny_detector, monkeypatch, tmp_path):
    # boto3's chain finds nothing: no AWS_* keys, no config files, no container or instance role to ask.
    for name in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    settings = _settings(s3_server, s3_access_key_id=None, s3_secret_access_key=None)
    row, sent = _check(ledger, tiny_detector, settings, {"s3": {"bucket": BUCKET, "key": "cat.png"}})
    assert (row.status, row.error_code, sent) == ("rejected", "s3.no_credentials", [])


def test_an_unreachable_store_is_retried_not_rejected(s3_server, ledger, tiny_detector):
    settings = _settings(s3_server, s3_endpoint_url=f"http://127.0.0.1:{free_port()}")  # nothing listens there
    row, sent = _check(ledger, tiny_detector, settings, {"s3": {"bucket": BUCKET, "key": "cat.png"}})
    assert (row.status, row.error_code) == ("queued", "s3.unavailable")
    assert sent == [row.id] and row.available_at > row.updated_at  # to be tried again, after a backoff


def test_a_store_that_never_answers_times_out_within_the_limit(s3_server):
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections (the backlog), never answers
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        settings = _settings(s3_server, s3_endpoint_url=endpoint, fetch_timeout_s=0.5)
        started = time.monotonic()
        with pytest.raises(s3.S3Error) as unavailable:
            s3.read_object(BUCKET, "cat.png", settings)
    assert unavailable.value.code == "s3.unavailable" and not unavailable.value.permanent
    assert time.monotonic() - started < 5  # two attempts of 0.5 s each, and botocore's backoff between them


def test_the_client_is_made_once_per_process_and_settings(s3_server):
    settings = _settings(s3_server)
    assert s3.client_for(settings) is s3.client_for(_settings(s3_server))
    assert s3.client_for(settings) is not s3.client_for(_settings(s3_server, s3_region="eu-west-1"))


# ---------------------------------------------------------------------- through `item submit` and a worker


@pytest.fixture(scope="module")
def stack(postgres_url, tiny_store, tmp_path_factory, s3_server):
    yield from make_stack(
        postgres_url,
        tiny_store,
        tmp_path_factory.mktemp("s3-stack"),
        ITEM_S3_ENDPOINT_URL=s3_server.url,
        ITEM_S3_REGION=REGION,
        ITEM_S3_ACCESS_KEY_ID=s3_server.key_id,
        ITEM_S3_SECRET_ACCESS_KEY=s3_server.secret,
        ITEM_S3_ALLOWED_BUCKETS=BUCKET,  # as an operator writes it: no JSON needed for one bucket
    )


def test_item_submit_s3_reference_through_a_real_worker(stack):
    worker = Worker(stack, "worker")
    try:
        submitted = stack.submit(f"s3://{BUCKET}/cat.png", f"s3://{BUCKET}/missing.png")
        rows = stack.wait_terminal([s["check_id"] for s in submitted], timeout=60)
    finally:
        worker.stop()
    found, missing = (rows[s["check_id"]] for s in submitted)
    assert found.status == "done", (found.error_code, found.error_message)
    assert found.image_sha256 == hashlib.sha256(IMAGE).hexdigest()
    assert (missing.status, missing.error_code) == ("rejected", "source.not_found")
