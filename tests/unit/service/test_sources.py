"""Unit tests for worker.sources.kinds: the shapes of the task's `image` object, the s3 kind above all.

No network and no store: these are the checks made when a message arrives, before anything is read.
"""

from __future__ import annotations

import pytest

from worker.settings import Settings
from worker.sources.kinds import S3_MAX_KEY_BYTES, SourceError, parse_s3_uri, to_stored, validate


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ({"s3": {"bucket": "images", "key": "u/123.jpg"}}, {"bucket": "images", "key": "u/123.jpg"}),
        ({"s3": "s3://images/u/123.jpg"}, {"bucket": "images", "key": "u/123.jpg"}),
        ({"s3": "S3://images/u/123.jpg"}, {"bucket": "images", "key": "u/123.jpg"}),  # schemes ignore case
        ({"s3": "s3://my.bucket-01/a b/ü.png?x#y"}, {"bucket": "my.bucket-01", "key": "a b/ü.png?x#y"}),  # key as is
        ({"s3": "s3://abc//leading-slash"}, {"bucket": "abc", "key": "/leading-slash"}),
        ({"s3": {"bucket": "a" * 63, "key": "k" * S3_MAX_KEY_BYTES}}, {"bucket": "a" * 63, "key": "k" * 1024}),
        ({"s3": {"bucket": "abc", "key": "é" * 512}}, {"bucket": "abc", "key": "é" * 512}),  # 1,024 UTF-8 bytes
        ({"s3": {"bucket": "1.2.3", "key": "k"}}, {"bucket": "1.2.3", "key": "k"}),  # dotted, but no IP address
    ],
)
def test_s3_sources_are_accepted_and_normalised_to_bucket_and_key(image, expected):
    assert validate(image) == ("s3", expected)


@pytest.mark.parametrize(
    "value",
    [
        {"bucket": "ab", "key": "k"},  # too short
        {"bucket": "a" * 64, "key": "k"},  # too long
        {"bucket": "Images", "key": "k"},  # upper case
        {"bucket": "my_bucket", "key": "k"},  # underscore
        {"bucket": "-images", "key": "k"},
        {"bucket": "images.", "key": "k"},
        {"bucket": "my..bucket", "key": "k"},
        {"bucket": "192.168.1.10", "key": "k"},  # shaped like an IP address
        {"bucket": "ima/ges", "key": "k"},
        {"bucket": "", "key": "k"},
        {"bucket": 123, "key": "k"},
        {"bucket": "images", "key": ""},
        {"bucket": "images", "key": None},
        {"bucket": "images", "key": ["a"]},
        {"bucket": "images", "key": "k" * (S3_MAX_KEY_BYTES + 1)},
        {"bucket": "images", "key": "é" * 513},  # 513 characters, 1,026 bytes
        {"bucket": "images", "key": "\ud800"},  # a lone surrogate: not encodable, so no key
        {"bucket": "images"},
        {"key": "k"},
        {"bucket": "images", "key": "k", "version": "3"},  # unknown fields are refused, not ignored
        ["images", "k"],
        42,
        "",
        "images/k",  # no scheme
        "https://images.s3.amazonaws.com/k",
        "s3://images",  # no key
        "s3://images/",  # empty key
        "s3:///k",  # no bucket
        "s3://",
    ],
)
def test_malformed_s3_sources_are_refused_as_invalid(value):
    with pytest.raises(SourceError) as refused:
        validate({"s3": value})
    assert refused.value.code == "source.invalid" and refused.value.permanent


def test_an_s3_source_is_one_kind_among_the_others():
    with pytest.raises(SourceError, match="exactly one of url, b64, path, s3"):
        validate({"s3": "s3://images/k", "url": "https://example.com/k.png"})
    with pytest.raises(SourceError, match="exactly one of url, b64, path, s3"):
        validate({})


@pytest.mark.parametrize("image", [{"url": 1}, {"path": ["/x"]}, {"b64": b"AAAA"}])
def test_the_other_kinds_still_need_strings(image):
    with pytest.raises(SourceError, match="must be a string"):
        validate(image)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://images/u/1.png", {"bucket": "images", "key": "u/1.png"}),
        ("s3://images/%41", {"bucket": "images", "key": "%41"}),  # no %-decoding: the key is what was written
    ],
)
def test_parse_s3_uri(uri, expected):
    assert parse_s3_uri(uri) == expected


@pytest.mark.parametrize("uri", ["", "s3:", "s3://", "s3://images", "s3://images/", "s3://Bad_Bucket/k", "/tmp/x"])
def test_parse_s3_uri_refuses_junk(uri):
    with pytest.raises(SourceError):
        parse_s3_uri(uri)


def test_a_long_junk_value_is_not_copied_whole_into_the_error():
    with pytest.raises(SourceError) as refused:
        validate({"s3": {"bucket": "x" * 1_000_000, "key": "k"}})
    assert len(refused.value.message) < 300


def test_an_s3_source_is_stored_as_bucket_and_key_whichever_form_it_came_in():
    def no_blobs(sha256: str, data: bytes) -> None:
        raise AssertionError("an s3 source keeps no blob")

    settings = Settings(database_url="sqlite://")
    stored = to_stored({"s3": "s3://images/u/1.png"}, settings, no_blobs)
    assert stored == {"s3": {"bucket": "images", "key": "u/1.png"}}
    assert to_stored(stored, settings, no_blobs) == stored  # a stored source re-validates to itself


def test_a_host_gets_no_more_than_its_slots_and_a_wait_past_the_limit_is_a_transient_timeout():
    import threading
    import time

    from worker.sources.kinds import BusyHost, HostSlots

    slots, inside, most = HostSlots(), [0], [0]
    lock = threading.Lock()

    def download() -> None:
        with slots.slot("images.example", 2, timeout_s=5):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.05)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=download) for _ in range(6)]
    for thread in threads:
        thread.start()
    with slots.slot("other.example", 2, timeout_s=0.01):  # another host is not kept waiting
        pass
    for thread in threads:
        thread.join()
    assert most[0] == 2

    with slots.slot("images.example", 1, timeout_s=1), pytest.raises(BusyHost) as busy:  # noqa: SIM117
        with slots.slot("images.example", 1, timeout_s=0.05):  # the one slot is taken: this waits, then gives up
            pass
    assert busy.value.code == "url.timeout" and not busy.value.permanent
