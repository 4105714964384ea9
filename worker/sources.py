"""Where a check's image comes from: exactly one of `url`, `b64` or `path` (the task contract), or a stored blob.

Inline bytes are kept in the ledger (as a blob, by sha256) when a check is created, so the message can be
lost and the check still re-run; the source recorded on the check then names the blob, not the bytes.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.errors import ItemError
from worker.settings import Settings

SOURCE_KINDS = ("url", "b64", "path")


class SourceError(ItemError):
    """The `image` object of a message is malformed or names something we may not read. Permanent."""

    code = "source.invalid"


def validate(image: Any) -> tuple[str, str]:
    """Checks the shape of the task's `image` argument; returns (kind, value)."""
    if not isinstance(image, dict):
        raise SourceError("`image` must be an object with exactly one of: url, b64, path.")
    # Present means not None: an empty b64 string is an (empty) image, refused later as image.empty.
    given = [kind for kind in (*SOURCE_KINDS, "blob") if image.get(kind) is not None]
    if len(given) != 1:
        raise SourceError(f"`image` must have exactly one of url, b64, path; it has {given or 'none of them'}.")
    kind = given[0]
    if not isinstance(image[kind], str):
        raise SourceError(f"`image.{kind}` must be a string.")
    return kind, image[kind]


def load(source: dict, settings: Settings, get_blob: Callable[[str], bytes | None]) -> bytes:
    """The bytes a stored source names: a blob from the ledger, a URL, an allowed local path or inline base64."""
    kind, value = validate(source)
    if kind == "blob":
        data = get_blob(value)
        if data is None:
            raise SourceError(f"Stored image {value} is gone.", code="source.blob_missing")
        return data
    if kind == "url":
        return fetch(value, settings)
    if kind == "path":
        return read_path(value, settings)
    return decode_b64(value, settings)


def parse_s3_uri(uri: str) -> dict:
    """{"bucket", "key"} of an s3://bucket/key reference. (Being written.)"""
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return {"bucket": bucket, "key": key}


def to_stored(image: dict, settings: Settings, put_blob: Callable[[str, bytes], None]) -> dict:
    """The source as recorded on a check: inline bytes are put away as a blob and named by their sha256."""
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
    try:
        if path.stat().st_size > settings.max_image_bytes:
            raise ItemError(f"{value} is over {settings.max_image_bytes:,} bytes.", code="image.too_large")
        return path.read_bytes()
    except FileNotFoundError:
        raise SourceError(f"{value} does not exist.", code="source.not_found") from None
    except (IsADirectoryError, PermissionError) as error:
        raise SourceError(f"{value} cannot be read: {error}", code="source.unreadable") from None


def fetch(value: str, settings: Settings) -> bytes:
    import ipaddress

    from worker.fetch import AddressPolicy, fetch_url

    allowed = tuple(ipaddress.ip_network(network) for network in settings.fetch_allowed_networks)
    return fetch_url(
        value,
        max_bytes=settings.max_image_bytes,
        timeout_s=settings.fetch_timeout_s,
        max_redirects=settings.fetch_max_redirects,
        policy=AddressPolicy(allowed=allowed),
    )
