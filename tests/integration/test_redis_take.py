"""The Redis take of `item.checks` (worker.intake.redis_take), on the machine's Redis: a message the server has
handed to a consumer that died before reading it is not lost; it is given back once the consumer stops saying
it is alive. (kombu's own BRPOP would have lost it: the server removes the message as it replies.)"""

from __future__ import annotations

import json
import socket
import time
import uuid

import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu import Connection

from tests.integration.conftest import take_connection
from tests.integration.stack import REDIS_URL
from worker.intake.broker import check_queue
from worker.settings import CHECK_QUEUE

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(["properties", "body", "x"]), children, max_size=3)
    ),
    max_leaves=8,
)


def _consuming_channel(connection: Connection, received: list | None = None):
    channel = connection.channel()
    check_queue()(channel).declare()
    keep = received.append if received is not None else lambda message: None
    channel.basic_consume(CHECK_QUEUE, False, keep, consumer_tag=uuid.uuid4().hex)
    return channel


def test_a_message_taken_by_a_consumer_that_died_is_given_back(prefix):
    raw = redis.Redis.from_url(REDIS_URL)
    with take_connection(prefix, transport=None) as platform:  # a platform's plain kombu client sends
        platform.Producer().publish({"external_id": "taken"}, routing_key=CHECK_QUEUE, declare=[check_queue()])
    assert raw.llen(f"{prefix}{CHECK_QUEUE}") == 1

    # a consumer takes it and dies before reading the server's reply (its process is gone: nothing of it runs)
    doomed_connection = take_connection(prefix)
    doomed = _consuming_channel(doomed_connection)
    doomed_connection.transport.cycle._register_BRPOP(doomed)  # as the event loop starts a take
    deadline = time.monotonic() + 5
    while raw.llen(f"{prefix}{CHECK_QUEUE}") and time.monotonic() < deadline:
        time.sleep(0.01)
    doomed.client.connection._sock.shutdown(socket.SHUT_RDWR)  # the reply is never read
    taking = f"{prefix}{CHECK_QUEUE}.taking.{doomed.consumer_id}"
    assert raw.llen(f"{prefix}{CHECK_QUEUE}") == 0 and raw.llen(taking) == 1  # moved, not gone

    # another consumer, once the first stopped saying it is alive, gives it back, and it is taken again
    with take_connection(prefix) as connection:
        received = []
        survivor = _consuming_channel(connection, received)
        survivor.sweep()
        assert raw.llen(taking) == 1  # still alive, as far as anyone can tell
        time.sleep(1.2)
        survivor.sweep()
        assert raw.llen(taking) == 0 and raw.llen(f"{prefix}{CHECK_QUEUE}") == 1
        connection.transport.cycle._register_BRPOP(survivor)
        deadline = time.monotonic() + 5
        while raw.llen(f"{prefix}{CHECK_QUEUE}") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert survivor._brpop_read() is True
        assert received and raw.llen(f"{survivor._key(survivor._taking(CHECK_QUEUE))}") == 0
        assert raw.hlen(f"{prefix}unacked") == 1  # recorded as unacknowledged, as kombu records it


def test_a_consumer_is_among_the_takers_before_its_first_take_even_after_sweeping_nothing(prefix):
    """The event loop sweeps every channel, also one not consuming yet: that must not count as saying it is alive,
    or its first take skips saying it, and what it takes before being killed is in a list no one gives back (the
    chaos run lost a message so)."""
    raw = redis.Redis.from_url(REDIS_URL)
    with take_connection(prefix) as connection:
        channel = connection.channel()
        channel.sweep()  # before any basic_consume: nothing to say alive for
        check_queue()(channel).declare()
        channel.basic_consume(CHECK_QUEUE, False, lambda message: None, consumer_tag=uuid.uuid4().hex)
        connection.transport.cycle._register_BRPOP(channel)  # the first take
        assert raw.smembers(f"{prefix}{CHECK_QUEUE}.takers") == {channel.consumer_id.encode()}
        channel.client.connection.disconnect()


def test_messages_sent_with_a_priority_are_taken_too(prefix):
    raw = redis.Redis.from_url(REDIS_URL)
    with take_connection(prefix, transport=None) as platform:
        platform.Producer().publish({"n": 1}, routing_key=CHECK_QUEUE, declare=[check_queue()], priority=6)
    assert raw.llen(f"{prefix}{CHECK_QUEUE}") == 0  # kombu keeps it in a list of that priority
    with take_connection(prefix) as connection:
        channel = _consuming_channel(connection)
        channel.sweep()
        assert raw.llen(f"{prefix}{CHECK_QUEUE}") == 1


def test_a_clean_close_gives_back_at_once_what_was_taken_and_not_recorded(prefix):
    raw = redis.Redis.from_url(REDIS_URL)
    with take_connection(prefix, transport=None) as platform:
        platform.Producer().publish({"n": 2}, routing_key=CHECK_QUEUE, declare=[check_queue()])
    with take_connection(prefix) as connection:
        channel = _consuming_channel(connection)
        connection.transport.cycle._register_BRPOP(channel)
        deadline = time.monotonic() + 5
        while raw.llen(f"{prefix}{CHECK_QUEUE}") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert raw.llen(f"{prefix}{CHECK_QUEUE}.taking.{channel.consumer_id}") == 1
        channel.close()
        assert raw.llen(f"{prefix}{CHECK_QUEUE}") == 1  # once: read, recorded, and given back as unacknowledged
        assert raw.llen(f"{prefix}{CHECK_QUEUE}.taking.{channel.consumer_id}") == 0


def _wrapped(received) -> list:
    """The messages delivered wrapped: what was no kombu message (or one kombu cannot open), bytes kept."""
    return [message for message in received if "item_unreadable" in message.headers]


def test_a_burst_is_taken_and_recorded_at_once_and_what_is_not_a_message_is_delivered_wrapped(prefix):
    raw = redis.Redis.from_url(REDIS_URL)
    with take_connection(prefix, transport=None) as platform:
        producer = platform.Producer()
        for n in range(10):
            producer.publish({"n": n}, routing_key=CHECK_QUEUE, declare=[check_queue()])
    raw.lpush(f"{prefix}{CHECK_QUEUE}", b"not json at all")  # taken last: the list is read from its other end
    received = []
    with take_connection(prefix) as connection:
        channel = _consuming_channel(connection, received)
        connection.transport.cycle._register_BRPOP(channel)
        time.sleep(0.2)
        assert channel._brpop_read() is True
        junk = _wrapped(received)
        assert [message.body for message in junk] == [b"not json at all"]  # the bytes, for its dead letter
        assert junk[0].content_type == "application/x-item-unreadable"  # that no reader accepts
        received = [message for message in received if message not in junk]
        assert [message.payload["n"] for message in received] == list(range(10))  # in order, in one read
        assert raw.hlen(f"{prefix}unacked") == 11 and raw.zcard(f"{prefix}unacked_index") == 11
        junk[0].ack()
        assert raw.llen(f"{prefix}{CHECK_QUEUE}") == 0
        assert raw.llen(f"{prefix}{CHECK_QUEUE}.taking.{channel.consumer_id}") == 0
        for message in received:  # acks of a batch leave the unacknowledged set together
            message.ack()
        assert raw.hlen(f"{prefix}unacked") == 0 and raw.zcard(f"{prefix}unacked_index") == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    junk=st.lists(
        st.binary(max_size=64)
        | st.text(max_size=40).map(str.encode)
        | JSON_VALUES.map(lambda v: json.dumps(v).encode()),
        min_size=1,
        max_size=6,
    )
)
def test_whatever_bytes_wait_in_the_queue_a_take_never_raises_nor_loses_one(prefix, junk):
    raw = redis.Redis.from_url(REDIS_URL)
    for key in raw.scan_iter(f"{prefix}*"):
        raw.delete(key)
    with take_connection(prefix, transport=None) as platform:
        platform.Producer().publish({"n": "real"}, routing_key=CHECK_QUEUE, declare=[check_queue()])
    for item in junk:  # a hostile client's LPUSH, mixed with a real message
        raw.lpush(f"{prefix}{CHECK_QUEUE}", item)
    received = []
    with take_connection(prefix) as connection:
        channel = _consuming_channel(connection, received)
        connection.transport.cycle._register_BRPOP(channel)
        time.sleep(0.05)
        assert channel._brpop_read() is True
        assert len(received) == len(junk) + 1  # each is delivered (as it came, or wrapped), none lost
        assert any(message not in _wrapped(received) and message.payload == {"n": "real"} for message in received)
        assert raw.llen(f"{prefix}{CHECK_QUEUE}") == 0
        assert raw.llen(f"{prefix}{CHECK_QUEUE}.taking.{channel.consumer_id}") == 0


def test_an_envelope_kombu_cannot_open_is_delivered_wrapped_not_redelivered_for_ever(prefix):
    raw = redis.Redis.from_url(REDIS_URL)
    with take_connection(prefix, transport=None) as platform:
        platform.Producer().publish({"n": "real"}, routing_key=CHECK_QUEUE, declare=[check_queue()])
    poisoned = {
        "body": "!!! not base64 !!!", "content-type": "application/json", "content-encoding": "utf-8", "headers": {},
        "properties": {"body_encoding": "base64", "delivery_tag": "poison", "delivery_info": {"exchange": "",
                       "routing_key": CHECK_QUEUE}},
    }  # fmt: skip
    raw.lpush(f"{prefix}{CHECK_QUEUE}", json.dumps(poisoned))
    received = []
    with take_connection(prefix) as connection:
        channel = _consuming_channel(connection, received)
        connection.transport.cycle._register_BRPOP(channel)
        time.sleep(0.05)
        assert channel._brpop_read() is True
        junk = _wrapped(received)
        assert [message.payload for message in received if message not in junk] == [{"n": "real"}]  # goes on
        assert raw.hexists(f"{prefix}unacked", "poison") is False  # never restored to fail again
        assert len(junk) == 1 and b"not base64" in junk[0].body  # delivered wrapped, for its dead letter
        assert raw.hexists(f"{prefix}unacked", junk[0].delivery_tag)  # and held like any message until filed
