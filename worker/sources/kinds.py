"""Where a check's image comes from: exactly one of `url`, `b64`, `path` or `s3` (the task contract), or a stored blob.

    url    an http(s) URL, fetched with the SSRF checks of `worker.sources.fetch`
    b64    the image's bytes in base64, at most ITEM_MAX_B64_BYTES
    path   a file under one of ITEM_ALLOWED_PATH_ROOTS
    s3     {"bucket": ..., "key": ...} in the store of the ITEM_S3_* settings (the string "s3://bucket/key" is
           accepted too, and recorded as the object)

Inline bytes are kept in the ledger (as a blob, by sha256) when a check is created, so the message can be
lost and the check still re-run; the source recorded on the check then names the blob, not the bytes. Only the
ledger itself may name a blob: a message saying `{"blob": sha256}` is refused, since anyone who knew an image's
hash could otherwise have another platform's upload scored and its caption sent to their own callback.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.core.errors import ItemError
from pipeline.core.files import read_image_file
from worker.settings import Settings
from worker.sources.addresses import AddressPolicy

SOURCE_KINDS = ("url", "b64", "path", "s3")
S3_MAX_KEY_BYTES = 1024  # S3's own limit, in UTF-8 bytes
# S3's bucket naming rules: 3-63 lowercase letters, digits, dots and hyphens, a letter or digit at either end.
# (AWS also reserves a few prefixes and suffixes; those are left to the store, since S3-compatible ones differ.)
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")

SourceValue = str | dict[str, str]  # a string, or the {"bucket", "key"} of an s3 source


class SourceError(ItemError):
    """The `image` object of a message is malformed or names something we may not read. Permanent."""

    code = "source.invalid"


def upload_limit(settings: Settings) -> int:
    """The most a source reads of one upload: a video's limit where videos are read (the decoder then holds a still
    image to ITEM_MAX_IMAGE_BYTES), else an image's."""
    return max(settings.max_image_bytes, settings.video_max_bytes if settings.video_frames else 0)


def validate(image: Any, *, stored: bool = False) -> tuple[str, SourceValue]:
    """Checks the shape of the task's `image` argument; returns (kind, value), an s3 value as {"bucket", "key"}.

    `stored`: the source as the ledger recorded it, which may name a blob; a submitted one never may.
    """
    one_of = ", ".join(SOURCE_KINDS)
    if not isinstance(image, dict):
        raise SourceError(f"`image` must be an object with exactly one of: {one_of}.")
    if not stored and image.get("blob") is not None:
        raise SourceError("`image.blob` names stored bytes and is not accepted in a submission: send `b64`.")
    # Present means not None: an empty b64 string is an (empty) image, refused later as image.empty.
    given = [kind for kind in (*SOURCE_KINDS, "blob") if image.get(kind) is not None]
    if len(given) != 1:
        raise SourceError(f"`image` must have exactly one of {one_of}; it has {given or 'none of them'}.")
    kind = given[0]
    if kind == "s3":
        return kind, s3_object(image[kind])
    if not isinstance(image[kind], str):
        raise SourceError(f"`image.{kind}` must be a string.")
    return kind, image[kind]


def s3_object(value: Any) -> dict[str, str]:
    """The {"bucket", "key"} an `image.s3` value names: that object itself, or an "s3://bucket/key" string."""
    if isinstance(value, str):
        return parse_s3_uri(value)
    if not isinstance(value, dict) or set(value) != {"bucket", "key"}:
        raise SourceError('`image.s3` must be {"bucket": ..., "key": ...} or "s3://bucket/key".')
    return _checked_s3(value["bucket"], value["key"])


def parse_s3_uri(uri: str) -> dict[str, str]:
    """{"bucket", "key"} of an s3://bucket/key reference; the key is taken as written (no %-decoding), as the
    AWS command line does."""
    if not isinstance(uri, str) or uri[:5].lower() != "s3://":
        raise SourceError(f"{_shown(uri)} is not an s3://bucket/key reference.")
    bucket, slash, key = uri[5:].partition("/")
    if not slash:
        raise SourceError(f"{_shown(uri)} names no key: s3://bucket/key.")
    return _checked_s3(bucket, key)


def _checked_s3(bucket: Any, key: Any) -> dict[str, str]:
    if not isinstance(bucket, str) or not _is_bucket_name(bucket):
        raise SourceError(
            f"S3 bucket {_shown(bucket)} is not a valid bucket name (3-63 lowercase letters, digits, dots and hyphens)."
        )
    if not isinstance(key, str) or not key:
        raise SourceError(f"The S3 key in bucket {bucket!r} must be a non-empty string.")
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate from a JSON "\ud800": no S3 key can hold it
        raise SourceError(f"The S3 key in bucket {bucket!r} is not valid Unicode.") from None
    if size > S3_MAX_KEY_BYTES:
        raise SourceError(f"The S3 key in bucket {bucket!r} is {size:,} bytes; S3 keys are at most 1,024.")
    return {"bucket": bucket, "key": key}


def _shown(value: Any) -> str:
    """A value from a message, as an error message may quote it: a foreign client's junk can be megabytes long."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _is_bucket_name(name: str) -> bool:
    if not _BUCKET_NAME.fullmatch(name) or ".." in name:
        return False
    try:
        ipaddress.IPv4Address(name)  # "192.168.5.4" matches the pattern but is refused by S3
    except ValueError:
        return True
    return False


def load(
    source: dict, settings: Settings, get_blob: Callable[[str], bytes | None], *, timeout_s: float | None = None
) -> bytes:
    """The bytes a stored source names: a blob from the ledger, a URL, an allowed local path, an S3 object or
    inline base64. A download takes at most `timeout_s` when it is shorter than the settings' limit (what is
    left of its batch's budget)."""
    kind, value = validate(source, stored=True)
    if kind == "blob":
        data = get_blob(value)
        if data is None:
            raise SourceError(f"Stored image {value} is gone.", code="source.blob_missing")
        return data
    limit = min(settings.fetch_timeout_s, timeout_s or settings.fetch_timeout_s)
    if kind == "url":
        return fetch(value, settings, timeout_s=limit)
    if kind == "path":
        return read_path(value, settings)
    if kind == "s3":
        with HOSTS.slot(f"s3:{value['bucket']}", settings.fetch_per_host, limit):
            return read_s3(value, settings, timeout_s=limit)
    return decode_b64(value, settings)


def to_stored(image: dict, settings: Settings, put_blob: Callable[[str, bytes], None]) -> dict:
    """The source as recorded on a check: inline bytes are put away as a blob and named by their sha256; an s3
    source is recorded as {"bucket", "key"}, whichever form it came in."""
    kind, value = validate(image)
    if kind != "b64":
        return {kind: value}
    data = decode_b64(value, settings)
    blob = hashlib.sha256(data).hexdigest()
    put_blob(blob, data)
    return {"blob": blob}


def decode_b64(value: str, settings: Settings) -> bytes:
    # Reject before decoding: base64 is 4/3 the size of its bytes, so a too-long string costs no memory.
    if len(value) > (settings.max_b64_bytes * 4) // 3 + 4:
        raise ItemError(f"Inline image is over {settings.max_b64_bytes:,} bytes.", code="image.too_large")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as error:
        raise SourceError(f"`image.b64` is not valid base64: {error}", code="source.bad_base64") from None


def read_path(value: str, settings: Settings) -> bytes:
    """A local file, only under an allowed root (after resolving symlinks and `..`)."""
    path = Path(value).resolve()
    roots = [Path(root).resolve() for root in settings.allowed_path_roots]
    if not any(path.is_relative_to(root) for root in roots):
        raise SourceError(
            f"{value} is not under an allowed root (ITEM_ALLOWED_PATH_ROOTS).", code="source.path_refused"
        )
    return read_image_file(path, upload_limit(settings), family="source", error=SourceError)


def fetch(value: str, settings: Settings, *, timeout_s: float | None = None) -> bytes:
    """An image URL's body; waiting for a free slot of its host counts against the same time limit."""
    import urllib.parse

    from worker.sources.fetch import fetch_url

    timeout_s = timeout_s or settings.fetch_timeout_s
    host = (urllib.parse.urlsplit(value).hostname or "").lower()
    deadline = time.monotonic() + timeout_s
    with HOSTS.slot(host, settings.fetch_per_host, timeout_s):
        return fetch_url(
            value,
            max_bytes=upload_limit(settings),
            timeout_s=max(0.01, deadline - time.monotonic()),
            max_redirects=settings.fetch_max_redirects,
            policy=fetch_policy(settings),
        )


def fetch_policy(settings: Settings) -> AddressPolicy:
    """Where image URLs may lead under these settings: the default refusals, less the allowed networks and hosts."""
    allowed = tuple(ipaddress.ip_network(network) for network in settings.fetch_allowed_networks)
    return AddressPolicy(allowed=allowed, allowed_hosts=tuple(settings.fetch_allowed_hosts))


def read_s3(value: dict[str, str], settings: Settings, *, timeout_s: float | None = None) -> bytes:
    from worker.sources.s3 import read_object  # boto3 is imported only by workers that meet an s3 source

    return read_object(value["bucket"], value["key"], settings, timeout_s, upload_limit(settings))


class BusyHost(ItemError):
    """The host's download slots stayed taken for the whole time limit. Transient, like any timeout."""

    code = "url.timeout"
    permanent = False


class HostSlots:
    """At most `per_host` downloads from one host at once, across a process's threads: a slow or flooded host
    then holds only its own slots, and the rest of the fetch pool keeps serving other hosts.

    Host names come from senders, so the table holds a host only while a download from it runs or waits: an entry
    goes as its last user leaves, and a flood of distinct names leaves nothing behind.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slots: dict[tuple[str, int], list] = {}  # (host, per_host) -> [semaphore, users holding or waiting]

    def __len__(self) -> int:
        return len(self._slots)

    @contextmanager
    def slot(self, host: str, per_host: int, timeout_s: float) -> Iterator[None]:
        key = (host, per_host)
        with self._lock:
            entry = self._slots.setdefault(key, [threading.BoundedSemaphore(per_host), 0])
            entry[1] += 1
        try:
            if not entry[0].acquire(timeout=timeout_s):
                raise BusyHost(
                    f"No download slot for {host} within {timeout_s:.1f} s: {per_host} downloads from it were "
                    "running (ITEM_FETCH_PER_HOST)."
                )
            try:
                yield
            finally:
                entry[0].release()
        finally:
            with self._lock:
                entry[1] -= 1
                if entry[1] == 0:
                    del self._slots[key]


HOSTS = HostSlots()
