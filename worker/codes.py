"""The stable error codes a check can end with, by the status they end it in (see the README's table).

The metrics create a series for each at zero, so an alert on `increase(item_checks_total[...])` sees the very
first failure of a kind (a series born at 1 has no increase to show).
"""

from __future__ import annotations

# Permanent: the input can never succeed. A check ends `rejected`, with no retry.
REJECTED = (
    "image.empty",
    "image.unsupported_format",
    "image.too_large",
    "image.truncated",
    "image.corrupt",
    "video.no_video_stream",
    "video.unsupported_codec",
    "video.too_large",
    "video.too_long",
    "video.too_many_frames",
    "video.decode_timeout",
    "video.no_frames",
    "video.truncated",
    "video.corrupt",
    "source.invalid",
    "source.bad_base64",
    "source.path_refused",
    "source.not_found",
    "source.unreadable",
    "source.blob_missing",
    "message.invalid",
    "callback.invalid",
    "url.invalid",
    "url.refused",
    "url.unresolvable",
    "url.too_many_redirects",
    "url.too_large",
    "url.http_4xx",
    "url.http_status",
    "url.tls",
    "s3.bucket_refused",
    "s3.no_such_bucket",
    "s3.access_denied",
    "s3.no_credentials",
    "s3.bad_endpoint",
    "s3.error",
    "quota.exceeded",
    "quota.backlog",
)
# Transient: retried with backoff; a check ends `failed` with one of these once its attempts are used up.
FAILED = (
    "check.timeout",
    "check.stuck",
    "check.internal_error",
    "gpu.out_of_memory",
    "gpu.fault",
    "url.timeout",
    "url.connection",
    "url.http_5xx",
    "s3.unavailable",
    "model.missing",
    "model.load_failed",
)
# Messages the intake could not file as a check: dead letters (`item deadletters`).
DEAD_LETTER = (
    "message.not_json",
    "message.undecodable",
    "message.unknown_task",
    "message.no_external_id",
    "message.too_large",
    "message.internal_error",
    "check.conflict",
)
