"""Each tenant's intake queue, and which queue (so which tenant) a message arrived on.

    default tenant   item.checks          (as before tenants: a deployment of one platform changes nothing)
    tenant <t>       item.checks.<t>      a direct exchange of the same name bound to it with its name as key

A message's tenant is the queue the broker delivered it from, never anything its sender wrote: a platform's
broker user may write only into its own queue (`worker.intake.broker_access`), so the queue is the identity the
broker vouches for. On RabbitMQ the broker names the consumer (its tag) a message was delivered to; on Redis the
take knows the list it moved the message from and overwrites what the envelope claims (`worker.intake.redis_take`).
"""

from __future__ import annotations

from kombu import Exchange, Queue

from worker.ledger.models import DEFAULT_TENANT
from worker.ledger.tenants import TENANT_ID
from worker.settings import CHECK_QUEUE


def queue_name(tenant_id: str) -> str:
    return CHECK_QUEUE if tenant_id == DEFAULT_TENANT else f"{CHECK_QUEUE}.{tenant_id}"


def tenant_of_queue(queue: str | None) -> str | None:
    """The tenant whose queue `queue` is; None for a queue that is no tenant's."""
    if queue == CHECK_QUEUE:
        return DEFAULT_TENANT
    tenant_id = tenant_suffix(queue, (CHECK_QUEUE,))
    return tenant_id if tenant_id != DEFAULT_TENANT else None


def tenant_suffix(queue: str | None, families) -> str | None:
    """The tenant id of `<family>.<tenant id>` for one of `families`; None for any other name. The one reading of
    a queue's name, shared by the intake (its tenant) and the Redis take (which queues it takes atomically)."""
    family, _, tenant_id = (queue if isinstance(queue, str) else "").rpartition(".")
    return tenant_id if family in families and TENANT_ID.fullmatch(tenant_id) else None


def tenant_queue(tenant_id: str = DEFAULT_TENANT) -> Queue:
    """A tenant's queue as Celery declares it by default (a durable direct exchange of the same name, routing by
    that name), so a platform's Celery client, the broker set-up and the workers agree on RabbitMQ."""
    name = queue_name(tenant_id)
    return Queue(name, Exchange(name, type="direct"), routing_key=name, durable=True)


class ArrivalQueues:
    """Which queue a message was delivered from, for one consumer (call on the consumer's thread)."""

    def __init__(self) -> None:
        self._by_tag: dict = {}

    def of(self, message, task_consumer=None) -> str | None:
        info = getattr(message, "delivery_info", None) or {}
        tag = info.get("consumer_tag")  # AMQP: set by the broker, the consumer it delivered to
        if tag is not None:
            # Only the broker's word counts: a tag this consumer does not know names no queue (its routing key was
            # written by the publisher, so it is never a fallback here).
            queue = self._by_tag.get(tag)
            if queue is None and task_consumer is not None:
                active = getattr(task_consumer, "_active_tags", None) or {}
                self._by_tag = {active_tag: name for name, active_tag in active.items()}
                queue = self._by_tag.get(tag)
            return queue
        # Redis: the take wrote the list it took the message from (and nothing else) into delivery_info
        return info.get("routing_key")
