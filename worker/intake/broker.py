"""The broker as every side of the deployment must see it: the queue's declaration and the transport's options.

The worker's Celery app, health probes and the queue-depth gauge all connect through these, so they agree with
each other and with a platform's Celery client.
"""

from __future__ import annotations

from kombu import Connection, Queue

from worker.intake.queues import tenant_queue
from worker.settings import CHECK_QUEUE, Settings

# Redis: a message stays unacknowledged at most ITEM_INTAKE_VISIBILITY_TIMEOUT_S before any worker gives it back to
# the queue (its worker died holding it). The intake holds a message for milliseconds; a ledger outage holds it
# longer, and a message given back meanwhile is filed once all the same (the external id is the idempotency key).
RESTORE_EVERY_S = 2  # how often a Redis worker looks for such messages


def check_queue() -> Queue:
    """`item.checks`, the default tenant's queue (`worker.intake.queues.tenant_queue` names every tenant's)."""
    return tenant_queue()


def transport_options(settings: Settings) -> dict:
    options: dict = {}
    if settings.redis_key_prefix:
        options["global_keyprefix"] = settings.redis_key_prefix
    if (settings.broker_url or "").startswith(("redis://", "rediss://", "unix://")):
        options.update(
            visibility_timeout=settings.intake_visibility_timeout_s,
            unacked_restore_interval=RESTORE_EVERY_S,
            unacked_restore_throttle=1,  # every sweep looks: the interval alone sets the pace
            # worker.intake.redis_take: item.checks and every tenant's item.checks.<t>, taken with BLMOVE, never
            # lost to a kill
            atomic_queues=[CHECK_QUEUE],
        )
    return options


def worker_transport(settings: Settings) -> str | None:
    """The kombu transport a worker consumes with: on Redis, kombu's own but taking item.checks atomically."""
    if (settings.broker_url or "").startswith(("redis://", "rediss://")):
        return "worker.intake.redis_take:Transport"
    return None


def broker_connection(settings: Settings) -> Connection:
    """A plain kombu connection to the deployment's broker (health probes, queue depth), with its key prefix."""
    return Connection(
        settings.broker_url, transport_options=transport_options(settings), heartbeat=0, connect_timeout=5
    )
