"""kombu's Redis transport, taking `item.checks` messages atomically: no message is lost to a kill.

kombu's Redis consumer takes a message with `BRPOP` and only then records it as unacknowledged. The server has
already removed it when it sends the reply: a worker killed before it has read that reply and written the
record (a loaded machine leaves the reply unread for milliseconds; the chaos benchmark lost 3 of 10,000 messages
to 5 SIGKILLs and a broker restart) loses the message. Here the take is `BLMOVE`: the server moves the message
into a list of this consumer's own (`<queue>.taking.<consumer>`) in the same step, and the consumer removes it
from there once kombu has recorded it as unacknowledged. A consumer alive says so with a key that expires after
`taking_alive_s` (15 s); any live consumer gives the list of one that stopped saying so back to the queue.

Only the queues named in the transport option `atomic_queues`, and each tenant's queue of theirs (`item.checks.<t>`),
are taken this way; every other use of the transport (events, remote control, replies) is kombu's own. Messages
sent with a priority land in kombu's per-priority lists; they are moved into the main list at each sweep, so they
are taken the same way. Platforms send as before: the lists and the message format are kombu's.

A channel consuming several tenants' queues cannot block on all of them at once (BLMOVE waits on one list): it
first takes from the first queue not empty, in kombu's rotating order, in one script (`TAKE_FIRST`, atomic as
BLMOVE is); only when every queue was empty does it wait on one of them, for `MANY_QUEUES_WAIT_S`, and then looks at
all again. A message on a quiet tenant's queue waits at most that long more than one on the queue waited on.

A message's queue is its tenant (`worker.intake.queues`): what its envelope says of its exchange and routing key
was written by whoever pushed it, so the take replaces it with the list it took the message from, for the intake
to read and for kombu to put the message back into if it is never acknowledged.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from time import monotonic, time

from kombu.asynchronous import get_event_loop
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import dumps, loads

from worker.intake.queues import tenant_suffix

log = logging.getLogger("item.intake")

ALIVE_S = 15.0
TAKE_AT_ONCE = 64  # messages one take moves when a burst waits: one round trip, not one each
SAY_ALIVE_EVERY_S = 5.0  # between the event loop's sweeps (every 2 s), in case they stop
MANY_QUEUES_WAIT_S = 0.1  # with several queues, all empty: how long to wait on one before looking at all again

# KEYS: queue, its taking list, next queue, its taking list, ...: the first message found is moved (as BLMOVE does)
TAKE_FIRST = """
for i = 1, #KEYS, 2 do
  local raw = redis.call('LMOVE', KEYS[i], KEYS[i + 1], 'RIGHT', 'LEFT')
  if raw then return {(i + 1) / 2, raw} end
end
return false
"""


class QoS(kombu_redis.QoS):
    """kombu's, but a take records its messages itself (`Channel._record`), and the acks that arrive together
    (a filed batch) leave the unacknowledged set in one round trip, on the event loop's next turn."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.recorded: set = set()  # delivery tags the take wrote already
        self._acks: list = []

    def append(self, message, delivery_tag):
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            return virtual.QoS.append(self, message, delivery_tag)  # in memory only: Redis has it
        return super().append(message, delivery_tag)

    def ack(self, delivery_tag):
        self._acks.append(delivery_tag)
        if len(self._acks) == 1:
            loop = get_event_loop()
            if loop is None:
                self.flush_acks()
            else:
                loop.call_soon(self.flush_acks)

    def flush_acks(self) -> None:
        tags, self._acks = self._acks, []
        if not tags:
            return
        with self.pipe_or_acquire() as pipe:
            for tag in tags:
                self._remove_from_indices(tag, pipe)
            pipe.execute()
        for tag in tags:
            virtual.QoS.ack(self, tag)

    def restore_visible(self, *args, **kwargs):
        """Called every few seconds by the event loop: say alive and give back what dead consumers took."""
        with contextlib.suppress(*self.channel.connection_errors):  # the broker is away: a later sweep does it
            self.channel.sweep()
        return super().restore_visible(*args, **kwargs)


class Channel(kombu_redis.Channel):
    QoS = QoS
    from_transport_options = (*kombu_redis.Channel.from_transport_options, "atomic_queues", "taking_alive_s")
    atomic_queues: tuple = ()
    taking_alive_s: float = ALIVE_S

    def __init__(self, *args, **kwargs):
        self._taking_from: list[str] | None = None  # the queues of the take in flight (several: TAKE_FIRST)
        self._look_at_all = True  # several queues: look at all (TAKE_FIRST) next, else wait on one
        self._took_from: set[str] = set()  # every queue this consumer has a taking list of
        self._take_command = "BLMOVE"
        self._said_alive_at = float("-inf")
        self._alive_for: set[str] = set()  # the queues whose takers this consumer last said it is one of
        super().__init__(*args, **kwargs)
        self.consumer_id = uuid.uuid4().hex

    def is_atomic(self, queue: str) -> bool:
        """One of `atomic_queues`, or a tenant's queue of one (`item.checks.<tenant>`)."""
        return is_atomic(queue, self.atomic_queues)

    # ------------------------------------------------------------------ the take

    def _brpop_start(self, timeout=None):
        queues = list(self.active_queues)
        if not queues or not all(self.is_atomic(queue) for queue in queues):
            return super()._brpop_start(timeout)
        self._took_from.update(queues)
        # A consumer takes from a queue only once it is among the queue's takers, or what it takes and never
        # acknowledges (it is killed) would sit in its list with no one to give it back: a new consumer, a queue
        # new to it (a tenant's, added while running), or a sweep missed.
        if monotonic() - self._said_alive_at > SAY_ALIVE_EVERY_S or not set(queues) <= self._alive_for:
            self.sweep()
        self._in_poll = self.client.connection
        self._brpop_sent_at = monotonic()
        wait = self.brpop_timeout if timeout is None else timeout
        if len(queues) > 1:
            queues = self._queue_cycle.consume(len(queues))  # kombu's rotation: the last one taken from is last
        if len(queues) > 1 and self._look_at_all:
            keys = [key for queue in queues for key in (self._key(queue), self._key(self._taking(queue)))]
            command = ["EVAL", TAKE_FIRST, len(keys), *keys]
        else:
            if len(queues) > 1:
                wait = min(wait or MANY_QUEUES_WAIT_S, MANY_QUEUES_WAIT_S)
                queues = queues[:1]
            command = ["BLMOVE", self._key(queues[0]), self._key(self._taking(queues[0])), "RIGHT", "LEFT", wait or 0]
        self._taking_from, self._take_command = queues, command[0]
        self.client.connection.send_command(*command)

    def _brpop_read(self, **options):
        queues = self._taking_from
        if queues is None:
            return super()._brpop_read(**options)
        try:
            try:
                reply = self.client.parse_response(self.client.connection, self._take_command, **options)
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            many = len(queues) > 1
            if not reply:  # nothing anywhere: wait on one queue next (or, having waited, look at all again)
                self._look_at_all = not many
                raise kombu_redis.Empty()
            self._look_at_all = True
            queue, raw = (queues[int(reply[0]) - 1], reply[1]) if many else (queues[0], reply)
            self._queue_cycle.rotate(queue)
            with self.conn_or_acquire() as client:  # not the blocking connection: it is the take's alone
                raws = [raw, *self._take_more(client, queue)]
                payloads = self._record(client, queue, raws)
            for payload in payloads:
                try:
                    self.connection._deliver(payload, queue)
                except Exception as error:  # an envelope kombu itself cannot open (a body that will not decode)
                    self._deliver_wrapped(queue, payload, error)
            return True
        finally:
            self._in_poll = None
            self._taking_from = None
            self._flush_brpop_reauth()

    def _take_more(self, client, queue: str) -> list[bytes]:
        """What else waits, up to what prefetch allows (at most TAKE_AT_ONCE in all), in one round trip."""
        room = self.qos.can_consume_max_estimate()
        count = min(TAKE_AT_ONCE, room if room is not None else TAKE_AT_ONCE) - 1
        if count <= 0:
            return []
        pipe = client.pipeline(transaction=False)
        for _ in range(count):
            pipe.execute_command("LMOVE", self._key(queue), self._key(self._taking(queue)), "RIGHT", "LEFT")
        return [raw for raw in pipe.execute() if raw is not None]

    def _record(self, client, queue: str, raws: list[bytes]) -> list[dict]:
        """Records the taken messages as unacknowledged, as kombu's QoS would one by one, and empties this
        consumer's list, in one round trip. What is not a kombu message at all is recorded and delivered wrapped
        in one (see `unreadable_envelope`): the intake makes it a dead letter, never lost, never taken again."""
        now, payloads = time(), []
        pipe = client.pipeline(transaction=False)
        for raw in raws:
            raw = raw if isinstance(raw, bytes) else raw.encode()
            try:
                payload = loads(bytes_to_str(raw))
                tag = payload["properties"]["delivery_tag"]
                # kombu's record is the JSON list [payload, exchange, routing key]: the payload as it arrived, and
                # the queue it was taken from (the anonymous exchange routes by queue name), not the one the
                # envelope claims: a message put back goes where it was, never into another tenant's queue
                record = b"[" + raw + b"," + dumps(["", queue]).encode()[1:]
            except Exception as error:  # not JSON, not an object, no properties: any bytes a client may push
                log.error("a message in %s is not a kombu message (%r); it becomes a dead letter", queue, error)
                payload = unreadable_envelope(raw, f"Not a kombu message: {error!r}", queue)
                tag, record = payload["properties"]["delivery_tag"], dumps([payload, "", queue]).encode()
            pipe.zadd(self.qos.unacked_index_key, {tag: now}).hset(self.qos.unacked_key, tag, record)
            self.qos.recorded.add(tag)
            payloads.append(payload)
        pipe.delete(self._taking(queue))  # it held this take and nothing else (DEL is prefixed by kombu's client)
        pipe.execute()
        return payloads

    def _deliver_wrapped(self, queue: str, payload: dict, error: Exception) -> None:
        """A recorded message kombu could not open: its record is swapped for that of the message wrapped (see
        `unreadable_envelope`), which is delivered instead; acked once the intake filed its dead letter."""
        log.error("a message in %s cannot be opened (%r); it becomes a dead letter", queue, error)
        tag = payload.get("properties", {}).get("delivery_tag")
        wrapped = unreadable_envelope(dumps(payload).encode(), f"kombu cannot open it: {error!r}", queue)
        self.qos.recorded.discard(tag)
        self.qos._delivered.pop(tag, None)
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            self.qos._remove_from_indices(tag, pipe)
            new_tag = wrapped["properties"]["delivery_tag"]
            pipe.zadd(self.qos.unacked_index_key, {new_tag: time()})
            pipe.hset(self.qos.unacked_key, new_tag, dumps([wrapped, "", queue]))
            pipe.execute()
        self.qos.recorded.add(new_tag)
        self.connection._deliver(wrapped, queue)

    # ------------------------------------------------------------------ liveness and recovery

    def sweep(self) -> None:
        queues = [queue for queue in self.active_queues if self.is_atomic(queue)]
        if not queues:  # consuming nothing yet: saying alive now would let the first take skip saying it
            return
        with self.conn_or_acquire() as client:
            self._say_alive(client, queues)
            for queue in queues:
                self._recover(client, queue)
                self._lift_priorities(client, queue)

    def close(self):
        """A clean close: kombu's reads a take still in flight and gives back what is unacknowledged; then
        whatever is left in this consumer's list (normally nothing) goes back too, not after a timeout."""
        with contextlib.suppress(Exception):  # acks still waiting for the loop's next turn: else filed twice
            self.qos.flush_acks()
        super().close()
        try:
            with self.conn_or_acquire() as client:
                for queue in self._took_from:
                    self._give_back(client, queue, self.consumer_id)
        except Exception:  # the broker is away: the list waits for a sweep once it is back
            log.debug("could not give back what this consumer took", exc_info=True)

    def _say_alive(self, client, queues: list[str]) -> None:
        pipe = client.pipeline(transaction=False)
        for queue in queues:
            pipe.execute_command("PSETEX", self._key(self._alive(queue)), int(self.taking_alive_s * 1000), "1")
            pipe.sadd(self._takers(queue), self.consumer_id)  # SADD is prefixed by kombu's client itself
        pipe.execute()
        self._said_alive_at, self._alive_for = monotonic(), set(queues)

    def _recover(self, client, queue: str) -> None:
        for member in client.smembers(self._takers(queue)):
            taker = bytes_to_str(member)
            if taker == self.consumer_id or client.execute_command("EXISTS", self._key(self._alive(queue, taker))):
                continue
            moved = self._give_back(client, queue, taker)
            client.srem(self._takers(queue), taker)
            if moved:
                log.warning("gave %d messages a dead consumer had taken back to %s", moved, queue)

    def _give_back(self, client, queue: str, taker: str) -> int:
        moved, taking = 0, self._key(self._taking(queue, taker))
        while client.execute_command("LMOVE", taking, self._key(queue), "RIGHT", "RIGHT") is not None:
            moved += 1  # back at the end the consumers take from: first in line again
        return moved

    def _lift_priorities(self, client, queue: str) -> None:
        for priority in self.priority_steps:
            source = self._q_for_pri(queue, priority)
            if source != queue:
                while client.execute_command("LMOVE", self._key(source), self._key(queue), "RIGHT", "LEFT"):
                    pass

    def _taking(self, queue: str, consumer: str | None = None) -> str:
        return f"{queue}.taking.{consumer or self.consumer_id}"

    def _alive(self, queue: str, consumer: str | None = None) -> str:
        return f"{queue}.alive.{consumer or self.consumer_id}"

    def _takers(self, queue: str) -> str:
        return f"{queue}.takers"

    def _key(self, name: str) -> str:
        """A key as stored: kombu's client prefixes only the commands it knows, and these are not among them."""
        return f"{self.global_keyprefix}{name}"


class Transport(kombu_redis.Transport):
    Channel = Channel

    def _deliver(self, message, queue):
        """Every delivery from an intake queue says the queue it came from, and nothing its sender claimed (a
        consumer tag, another queue): the intake reads its tenant from there (`worker.intake.queues`)."""
        families = self.client.transport_options.get("atomic_queues", ())
        properties = message.get("properties") if isinstance(message, dict) else None
        if queue and isinstance(properties, dict) and is_atomic(queue, families):
            properties["delivery_info"] = {"exchange": "", "routing_key": queue}
        return super()._deliver(message, queue)


def is_atomic(queue: str, families) -> bool:
    """`queue` is one of `families` or a tenant's queue of one (`<family>.<tenant id>`)."""
    return queue in families or tenant_suffix(queue, families) is not None


UNREADABLE_TYPE = "application/x-item-unreadable"  # no reader accepts it: the intake's dead letter keeps the bytes


def unreadable_envelope(raw: bytes, why: str, queue: str) -> dict:
    """A kombu envelope around bytes that were none (or one kombu cannot open): an `item.check` message whose
    body is those bytes under a content type no reader accepts, so the intake files it as a dead letter
    (`message.undecodable`, `why` its reason) and acknowledges it like any other message."""
    import base64

    tag = str(uuid.uuid4())
    return {
        "body": base64.b64encode(raw).decode(),
        "content-encoding": "binary",
        "content-type": UNREADABLE_TYPE,
        "headers": {"task": "item.check", "id": tag, "item_unreadable": why[:500]},
        "properties": {
            "delivery_tag": tag,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "body_encoding": "base64",
            "priority": 0,
        },
    }
