"""Tenant queue names and the rules of each tenant's broker user, as text (the servers are in
tests/integration/test_broker_access.py): no tenant's rule can match another tenant's queue."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.core.errors import ItemError
from worker.intake import broker_access as access
from worker.intake.queues import ArrivalQueues, queue_name, tenant_of_queue
from worker.intake.redis_take import is_atomic
from worker.ledger.tenants import TENANT_ID


@pytest.mark.parametrize(
    ("queue", "tenant"),
    [
        ("item.checks", "default"),
        ("item.checks.shop", "shop"),
        ("item.checks.a-b_1", "a-b_1"),
        ("item.checks.default", None),  # the default tenant's queue is item.checks, never a second one
        ("item.checks.Shop", None),
        ("item.checks.shop.taking.x", None),
        ("item.checksx", None),
        ("celery", None),
        (None, None),
    ],
)
def test_a_queue_names_its_tenant_or_none(queue, tenant):
    assert tenant_of_queue(queue) == tenant
    if tenant is not None:
        assert queue_name(tenant) == queue


def test_the_redis_take_takes_every_tenants_queue_and_nothing_beside_them():
    families = ("item.checks",)
    assert is_atomic("item.checks", families) and is_atomic("item.checks.shop", families)
    assert not is_atomic("item.checks.shop.taking.x", families) and not is_atomic("celery", families)


def test_a_rabbitmq_user_writes_only_its_own_exchange():
    configure, write, read = access.rabbitmq_grant("shop", "/").permissions
    assert (configure, read) == ("^$", "^$")
    for name in ("item.checks.shop",):
        assert re.fullmatch(write, name)
    for name in ("item.checks.shop2", "item.checks.sho", "item.checksXshop", "amq.default", "", "item.checks"):
        assert not re.search(write, name), name


def test_a_redis_acl_names_only_the_tenants_keys_under_the_prefix_taken_literally():
    arguments = access.redis_acl("shop", "secret", prefix="p[1]*:")
    assert arguments[:6] == ["item-shop", "reset", "on", ">secret", "resetchannels", "-@all"]
    patterns = [argument for argument in arguments if argument.startswith("~")]
    assert patterns == [
        r"~p\[1\]\*:item.checks.shop",
        "~p\\[1\\]\\*:item.checks.shop\x06\x16*",
        r"~p\[1\]\*:_kombu.binding.item.checks.shop",
        r"~p\[1\]\*:_kombu.binding_permanent.item.checks.shop",
    ]
    line = access.redis_acl_line(arguments)
    assert "\x06" not in line and r'"~p\\[1\\]\\*:item.checks.shop\x06\x16*"' in line


def test_a_bad_tenant_id_makes_no_rule():
    with pytest.raises(ItemError) as refused:
        access.redis_acl("a b", "secret")
    assert refused.value.code == "tenant.invalid"


def test_the_platforms_url_is_the_services_with_the_tenants_user():
    url = access.platform_url("amqp://item:pw@rabbit.internal:5672/item", "item-shop", "p@ss/word")
    assert url == "amqp://item-shop:p%40ss%2Fword@rabbit.internal:5672/item"
    assert access.vhost_of(url) == "item" and access.vhost_of("amqp://h//") == "/"
    assert access.vhost_of("amqp://item:pw@rabbit.internal/%2F") == "/"  # the default vhost, written as kombu takes it


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.none(), st.text(max_size=80), st.from_regex(r"item\.checks\.[ -~]{0,70}", fullmatch=True)))
def test_any_queue_name_reads_as_a_valid_tenant_or_none_the_same_for_intake_and_take(queue):
    tenant = tenant_of_queue(queue)
    assert tenant is None or (TENANT_ID.fullmatch(tenant) and queue_name(tenant) == queue)
    atomic = isinstance(queue, str) and is_atomic(queue, ("item.checks",))
    assert atomic == (tenant is not None or queue == "item.checks.default")  # one reading of a name, for both


@settings(max_examples=200, deadline=None)
@given(tag=st.text(max_size=20), routing_key=st.text(max_size=40))
def test_an_amqp_delivery_names_its_queue_by_the_brokers_consumer_tag_only(tag, routing_key):
    """A tag the consumer does not know names no queue: the routing key, which the publisher wrote, is never a
    fallback (a message a tenant routed to look like another's is no one's, a dead letter)."""

    class Consumer:
        _active_tags = {"item.checks.shop": "tag-shop"}

    class Delivered:
        delivery_info = {"consumer_tag": tag, "routing_key": routing_key}

    expected = "item.checks.shop" if tag == "tag-shop" else None
    assert ArrivalQueues().of(Delivered(), Consumer()) == expected
