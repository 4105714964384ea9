"""The host allow-list (ITEM_FETCH_ALLOWED_HOSTS) against a real HTTP server on 127.0.0.1, reached through names an
injected resolver maps to it: an allowed name may resolve to a private address, no other name may, and every hop of
a redirect is judged by its own name."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import quote

import pytest

from tests.integration.test_fetch import PNG, FakeResolver, Running, serve
from worker.settings import Settings
from worker.sources.fetch import FetchError, fetch_url
from worker.sources.kinds import fetch_policy

MiB = 1024 * 1024
NAMES = ("img.internal", "img.internal.", "other.internal", "a.cdn.internal", "b.a.cdn.internal", "cdn.internal")


@pytest.fixture(scope="module")
def server() -> Iterator[Running]:
    yield from serve()


@pytest.fixture
def resolver() -> FakeResolver:
    return FakeResolver({name: [["127.0.0.1"]] for name in NAMES})


def policy(*hosts: str):
    return fetch_policy(Settings(database_url="sqlite://", fetch_allowed_hosts=list(hosts)))


def get(url: str, resolver: FakeResolver, *hosts: str) -> bytes:
    return fetch_url(url, max_bytes=MiB, timeout_s=5, policy=policy(*hosts), resolve=resolver)


def refused(url: str, resolver: FakeResolver, *hosts: str) -> FetchError:
    with pytest.raises(FetchError) as caught:
        get(url, resolver, *hosts)
    assert (caught.value.code, caught.value.permanent) == ("url.refused", True)
    return caught.value


def test_an_allowed_host_reaches_its_private_address(server, resolver):
    assert get(server.url("/image", "img.internal"), resolver, "img.internal") == PNG
    assert get(server.url("/image", "IMG.Internal."), resolver, "img.internal") == PNG  # as names are written


def test_every_other_host_is_refused_the_same_address(server, resolver):
    error = refused(server.url("/image", "other.internal"), resolver, "img.internal")
    assert "other.internal resolves to 127.0.0.1" in error.message and "loopback" in error.message
    refused(server.url("/image"), resolver, "img.internal")  # the address itself is no allowed name
    refused(server.url("/image", "img.internal"), resolver)  # no allow-list: refused as before


@pytest.mark.parametrize(
    ("host", "allowed"), [("a.cdn.internal", True), ("b.a.cdn.internal", True), ("cdn.internal", False)]
)
def test_a_wildcard_allows_the_subdomains_of_its_name(server, resolver, host, allowed):
    url = server.url("/image", host)
    if allowed:
        assert get(url, resolver, "*.cdn.internal") == PNG
    else:
        refused(url, resolver, "*.cdn.internal")


def test_a_redirect_within_the_allowed_host_is_followed(server, resolver):
    assert get(server.url("/chain/2", "img.internal"), resolver, "img.internal") == PNG


def test_a_redirect_from_an_allowed_host_to_another_private_host_is_refused(server, resolver):
    elsewhere = quote(server.url("/image", "other.internal"), safe="")
    error = refused(server.url(f"/to?u={elsewhere}", "img.internal"), resolver, "img.internal")
    assert "other.internal" in error.message and "redirected from" in error.message
    bare = quote(server.url("/image"), safe="")  # nor to the private address by number
    refused(server.url(f"/to?u={bare}", "img.internal"), resolver, "img.internal")


def test_a_redirect_to_an_allowed_host_is_followed_from_another_allowed_one(server, resolver):
    there = quote(server.url("/image", "a.cdn.internal"), safe="")
    assert get(server.url(f"/to?u={there}", "img.internal"), resolver, "img.internal", "*.cdn.internal") == PNG
