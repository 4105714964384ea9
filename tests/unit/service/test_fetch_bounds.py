"""The fetcher's bookkeeping stays bounded whatever senders send: per-host slots for attacker-chosen host names, DNS
lookups through a resolver that stopped answering, and the host allow-list's matching."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from worker.settings import Settings
from worker.sources import fetch, lookups
from worker.sources.addresses import AddressPolicy, FetchError
from worker.sources.kinds import HostSlots, fetch_policy


def test_a_hundred_thousand_host_names_leave_the_slot_table_empty():
    slots = HostSlots()
    for i in range(100_000):
        with slots.slot(f"h{i}.attacker.example", 16, timeout_s=1):
            pass
    assert len(slots) == 0


def test_a_host_keeps_its_entry_while_a_download_holds_or_waits_for_its_slot():
    slots, inside, leave = HostSlots(), threading.Event(), threading.Event()

    def hold() -> None:
        with slots.slot("busy.example", 1, timeout_s=5):
            inside.set()
            leave.wait(5)

    def wait_then_take() -> None:
        with slots.slot("busy.example", 1, timeout_s=5):
            pass

    holder, waiter = threading.Thread(target=hold), threading.Thread(target=wait_then_take)
    holder.start()
    inside.wait(5)
    waiter.start()
    for i in range(1000):  # others come and go meanwhile
        with slots.slot(f"other{i}.example", 1, timeout_s=1):
            pass
    assert len(slots) == 1  # busy.example, held by one and waited for by the other
    leave.set()
    holder.join(5)
    waiter.join(5)
    assert len(slots) == 0


@pytest.fixture
def hung_resolver():
    """A resolver that never answers until the test ends; the process's lookup threads are free again afterwards."""
    answer = threading.Event()
    asked = []
    _settle()  # lookups left behind by an earlier test end first

    def resolve(host, port, *args, **kwargs):
        asked.append(host)
        answer.wait(60)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))]

    yield resolve, asked
    answer.set()
    _settle()
    assert fetch.LOOKUPS.busy == 0 and fetch.LOOKUPS.abandoned == 0


def _settle(timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while fetch.LOOKUPS.busy and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_resolver_outage_costs_a_fixed_number_of_threads_and_each_fetch_a_typed_error(hung_resolver):
    resolve, asked = hung_resolver
    before = threading.active_count()
    codes = []
    for i in range(1000):
        with pytest.raises(FetchError) as caught:
            fetch.fetch_url(f"http://h{i}.example/x.png", max_bytes=1024, timeout_s=0.02, resolve=resolve)
        assert not caught.value.permanent
        codes.append(caught.value.code)
    assert threading.active_count() <= before + lookups.LOOKUP_THREADS
    assert set(codes) == {"url.timeout", "url.connection"}
    assert codes[: lookups.LOOKUP_THREADS] == ["url.timeout"] * lookups.LOOKUP_THREADS  # these waited their budget
    assert len(asked) == lookups.LOOKUP_THREADS  # the rest failed at once, without a lookup queued or a thread


def test_concurrent_fetches_during_an_outage_wait_at_most_their_budget(hung_resolver):
    resolve, _ = hung_resolver
    errors, before = [], threading.active_count()

    def attempt(i: int) -> None:
        started = time.monotonic()
        try:
            fetch.fetch_url(f"http://c{i}.example/x.png", max_bytes=1024, timeout_s=0.2, resolve=resolve)
        except FetchError as error:
            errors.append((error.code, time.monotonic() - started))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(64)]
    for thread in threads:
        thread.start()
    peak = threading.active_count()
    for thread in threads:
        thread.join(5)
    assert peak <= before + 64 + lookups.LOOKUP_THREADS
    assert len(errors) == 64 and all(code in ("url.timeout", "url.connection") for code, _ in errors)
    assert max(took for _, took in errors) < 1.0


def test_a_domain_whose_name_servers_hang_holds_two_threads_and_no_other_domain_waits(hung_resolver):
    hang, asked = hung_resolver

    def resolve(host, port, *args, **kwargs):
        if host.endswith(".evil.test"):
            return hang(host, port)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("192.0.2.1", port))]  # a documentation address

    codes = []
    for i in range(200):  # a sender's names under one domain
        with pytest.raises(FetchError) as caught:
            fetch.fetch_url(f"http://x{i}.evil.test/a.png", max_bytes=1024, timeout_s=0.02, resolve=resolve)
        codes.append(caught.value.code)
    assert len(asked) == lookups.PER_DOMAIN and codes.count("url.timeout") == lookups.PER_DOMAIN
    assert set(codes[lookups.PER_DOMAIN :]) == {"url.connection"}
    for i in range(50):  # everyone else's lookups answer: the address is then refused, as a documentation address
        with pytest.raises(FetchError) as caught:
            fetch.fetch_url(f"http://img{i}.good{i}.test/a.png", max_bytes=1024, timeout_s=1, resolve=resolve)
        assert caught.value.code == "url.refused"


def test_lookups_that_answer_share_the_threads():
    pool = lookups.Lookups(2)
    answers = [pool.run("h", lambda i=i: i, time.monotonic() + 5, TimeoutError) for i in range(200)]
    assert answers == list(range(200)) and pool.started <= 2 and pool.busy == 0


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("cdn.internal", True),
        ("CDN.internal.", True),
        ("img.cdn.internal", False),
        ("a.img.example.com", True),
        ("b.a.img.example.com", True),
        ("img.example.com", False),  # *.x is the subdomains of x, not x
        ("evilimg.example.com", False),
        ("img.example.com.evil.test", False),
        ("cdn.internal.evil.test", False),
    ],
)
def test_the_allow_list_matches_names_and_subdomains(host, allowed):
    policy = AddressPolicy(allowed_hosts=("cdn.internal", "*.img.example.com"))
    assert policy.host_allowed(host) is allowed


def test_an_allowed_host_may_resolve_to_a_private_address_and_no_other_host_may():
    import ipaddress

    policy = fetch_policy(Settings(database_url="sqlite://", fetch_allowed_hosts=["cdn.internal"]))
    private = ipaddress.ip_address("10.1.2.3")
    policy.check(private, host="cdn.internal")
    with pytest.raises(FetchError) as refused:
        policy.check(private, host="other.internal")
    assert refused.value.code == "url.refused"
    with pytest.raises(FetchError):
        policy.check(private)  # no name: the address alone decides
