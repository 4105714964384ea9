"""Reads an image from S3 or an S3-compatible store (MinIO, Ceph, R2...) for an `s3` source.

The endpoint, region and credentials come from the settings, never from the message: a platform names only a
bucket and a key, and only the buckets `ITEM_S3_ALLOWED_BUCKETS` names may be read, none when it names none (the
worker's credentials often read far more than the images it should check). One boto3 client is made per process
and settings (making one takes 0.1-0.2 s), with path-style addressing, which every S3-compatible store
understands, and short timeouts and few retries, since the check itself is retried with backoff. An object over
the upload limit (`kinds.upload_limit`: `max_image_bytes`, or the video limit where videos are read) is refused
from the size in the response's headers, before its body is read; the body is read in chunks, at most that limit
+ 1 bytes and within `fetch_timeout_s`.

Every failure is an `S3Error` with a stable code; `permanent` says whether trying again can ever help:

    s3.bucket_refused   permanent  the bucket is not in ITEM_S3_ALLOWED_BUCKETS, or that is empty (no request is made)
    s3.no_such_bucket   permanent  the store has no such bucket
    source.not_found    permanent  the bucket has no such key
    s3.access_denied    permanent  refused: unknown key id, wrong secret, or a policy that does not allow the read
    s3.no_credentials   permanent  no credentials in the settings nor in boto3's chain (env, config files, role)
    s3.bad_endpoint     permanent  ITEM_S3_ENDPOINT_URL is not a usable URL
    s3.error            permanent  any other 4xx answer (an archived object...), or a request botocore refuses
    image.too_large     permanent  the object is over the upload limit
    s3.unavailable      transient  throttled, 5xx, connection refused or lost, or a timeout
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import boto3
import botocore.exceptions as boto_errors
from botocore.config import Config

from pipeline.core.errors import ItemError
from worker.settings import Settings

_CHUNK = 64 * 1024
# One retry inside botocore covers a dropped connection; longer outages are the check's own retries (with backoff).
_ATTEMPTS = 2

_NOT_FOUND = {"NoSuchKey", "NoSuchVersion", "NotFound"}
_ACCESS_DENIED = {
    "AccessDenied",
    "AccountProblem",
    "AllAccessDisabled",
    "ExpiredToken",
    "InvalidAccessKeyId",
    "InvalidToken",
    "SignatureDoesNotMatch",
}
_BUSY = {
    "InternalError",
    "RequestLimitExceeded",
    "RequestTimeout",
    "ServiceUnavailable",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
}
# 4xx answers that mean "come back later": the request timed out, or too many requests.
_RETRYABLE_STATUSES = {408, 429}
# Everything botocore raises when no (complete) answer came back: refused, reset, timed out, TLS, cut short.
_NETWORK_ERRORS = (boto_errors.ConnectionError, boto_errors.HTTPClientError, boto_errors.IncompleteReadError)
NO_CREDENTIALS = (
    "no S3 credentials: set ITEM_S3_ACCESS_KEY_ID and ITEM_S3_SECRET_ACCESS_KEY, or give the worker boto3's own "
    "(AWS_* variables, ~/.aws, an instance or task role)."
)


class S3Error(ItemError):
    """An `s3` source may not, or could not, be read. `code` and `permanent` are set per case (see above)."""

    code = "s3.error"

    def __init__(self, message: str, *, code: str, permanent: bool = True):
        super().__init__(message, code=code)
        self.permanent = permanent


def read_object(
    bucket: str, key: str, settings: Settings, timeout_s: float | None = None, max_bytes: int | None = None
) -> bytes:
    """The bytes of s3://bucket/key, within the settings' size and time limits (and `timeout_s`, if shorter); at most
    `max_bytes` (the upload limit: `kinds.upload_limit`), else `max_image_bytes`."""
    where = f"s3://{bucket}/{key}"
    if bucket not in settings.s3_allowed_buckets:
        raise S3Error(f"{where}: {_refusal(bucket, settings)}", code="s3.bucket_refused")
    try:
        client = client_for(settings)
    except S3Error as error:  # the settings are at fault, not the object; the message still names it
        raise S3Error(f"{where}: {error.message}", code=error.code) from None
    # botocore's own retry counts against it too
    deadline = time.monotonic() + min(settings.fetch_timeout_s, timeout_s or settings.fetch_timeout_s)
    try:
        response = client.get_object(Bucket=bucket, Key=key)
        return _read_body(response, where, max_bytes or settings.max_image_bytes, deadline)
    except boto_errors.ClientError as error:
        raise _from_answer(error, bucket, where) from None
    except (boto_errors.NoCredentialsError, boto_errors.PartialCredentialsError):
        raise S3Error(f"{where}: {NO_CREDENTIALS}", code="s3.no_credentials") from None
    except boto_errors.CredentialRetrievalError as error:  # a role's credentials could not be fetched, for now
        raise S3Error(f"{where}: no credentials for now: {error}", code="s3.unavailable", permanent=False) from None
    except _NETWORK_ERRORS as error:
        raise S3Error(f"{where}: the store did not answer: {error}", code="s3.unavailable", permanent=False) from None
    except boto_errors.BotoCoreError as error:  # anything else botocore will not send: a bug here, not the store's
        raise S3Error(f"{where}: the read could not be made: {error}", code="s3.error") from None


def _refusal(bucket: str, settings: Settings) -> str:
    if not settings.s3_allowed_buckets:
        return "no bucket may be read: name the buckets checks may read in ITEM_S3_ALLOWED_BUCKETS."
    return f"bucket {bucket!r} is not in ITEM_S3_ALLOWED_BUCKETS."


def _read_body(response: dict[str, Any], where: str, max_bytes: int, deadline: float) -> bytes:
    body = response["Body"]
    size = response.get("ContentLength")
    if size is not None and size > max_bytes:
        body.close()  # drops the connection instead of downloading what nobody will read
        raise S3Error(f"{where} is {size:,} bytes, over the {max_bytes:,}-byte limit.", code="image.too_large")
    data = bytearray()
    # Bounded even when the store sends no length or a wrong one, or trickles the bytes in.
    while chunk := body.read(_CHUNK):
        data += chunk
        if len(data) > max_bytes:
            body.close()
            raise S3Error(f"{where} is over the {max_bytes:,}-byte limit.", code="image.too_large")
        if time.monotonic() > deadline:
            body.close()
            raise S3Error(f"{where}: the download took too long.", code="s3.unavailable", permanent=False)
    return bytes(data)


def _from_answer(error: boto_errors.ClientError, bucket: str, where: str) -> S3Error:
    """The store answered with an error: by its S3 error code first, its HTTP status otherwise."""
    answer = error.response.get("Error", {})
    code = str(answer.get("Code", ""))
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
    if code == "NoSuchBucket":
        return S3Error(f"{where}: there is no bucket {bucket!r}.", code="s3.no_such_bucket")
    if code in _NOT_FOUND or (status == 404 and code not in _ACCESS_DENIED):
        return S3Error(f"{where} does not exist.", code="source.not_found")
    # The server's own message is left out here: some stores echo the request's key id in it.
    if code in _ACCESS_DENIED or status == 403:
        return S3Error(f"{where}: access denied ({code or status}).", code="s3.access_denied")
    if code in _BUSY or status >= 500 or status in _RETRYABLE_STATUSES:
        return S3Error(f"{where}: the store is unavailable ({code or status}).", code="s3.unavailable", permanent=False)
    detail = str(answer.get("Message", ""))[:200]
    return S3Error(f"{where}: the store refused the read ({code or status}: {detail}).", code="s3.error")


def client_for(settings: Settings):
    """This process's S3 client for these settings (made on first use)."""
    secret = settings.s3_secret_access_key
    return _client(
        os.getpid(),  # a client must not cross a fork (prefork workers): each process makes its own
        settings.s3_endpoint_url,
        settings.s3_region,
        settings.s3_access_key_id,
        secret.get_secret_value() if secret is not None else None,
        settings.fetch_timeout_s,
    )


@functools.lru_cache(maxsize=8)
def _client(pid: int, endpoint_url: str | None, region: str, key_id: str | None, secret: str | None, timeout_s: float):
    # An exception is not cached: a credential chain that found nothing (a role not ready yet) is asked again.
    if (key_id is None) != (secret is None):
        message = "ITEM_S3_ACCESS_KEY_ID and ITEM_S3_SECRET_ACCESS_KEY must be set together."
        raise S3Error(message, code="s3.no_credentials")
    session = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret, region_name=region)
    if session.get_credentials() is None:
        raise S3Error(NO_CREDENTIALS, code="s3.no_credentials")
    config = Config(
        connect_timeout=timeout_s,
        read_timeout=timeout_s,
        retries={"total_max_attempts": _ATTEMPTS, "mode": "standard"},
        s3={"addressing_style": "path"},  # bucket in the path: no wildcard DNS needed for MinIO & co
        # Checksums only where the API demands them: some S3-compatible stores reject or lack the newer ones.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    try:
        return session.client("s3", endpoint_url=endpoint_url, config=config)
    except ValueError as error:  # botocore's answer to an endpoint it cannot parse
        raise S3Error(f"ITEM_S3_ENDPOINT_URL is not usable: {error}", code="s3.bad_endpoint") from None
