"""Celery applications derived from the settings: JSON only, late acks, one message at a time.

`make_celery(settings)` is the configuration alone, what a client needs to send; `worker.tasks.worker_app`
adds the tasks for `item worker`. Messages in any other serializer are refused by `accept_content`, so a
pickle message can never execute code here.
"""

from __future__ import annotations

from celery import Celery

from worker.settings import CHECK_QUEUE, CHECK_TASK, RESCORE_QUEUE, Settings

QUEUES = (CHECK_QUEUE, RESCORE_QUEUE)  # in priority order

RECONCILE_TASK = "item.reconcile"
GRACE_S = 30  # between the soft limit (the batch is ended cleanly) and the hard one (the process is killed)


def make_celery(settings: Settings) -> Celery:
    app = Celery("item", broker=settings.broker_url or "memory://")
    # "priority": a worker takes from the first of its queues that has a message (kombu's default rotates through
    # them), so re-score messages are read only while no fresh upload waits.
    transport = {"visibility_timeout": settings.visibility_timeout_s, "queue_order_strategy": "priority"}
    if settings.redis_key_prefix:
        transport["global_keyprefix"] = settings.redis_key_prefix
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        task_ignore_result=True,  # the ledger is the record; there is no result backend
        task_acks_late=True,  # a message is acked after its check is stored, not when it arrives
        task_reject_on_worker_lost=True,  # a worker process killed mid-batch puts its message back
        worker_prefetch_multiplier=1,  # long GPU work: never hoard messages another worker could take
        worker_concurrency=settings.worker_concurrency,
        task_default_queue=CHECK_QUEUE,
        task_routes={CHECK_TASK: {"queue": CHECK_QUEUE}, RECONCILE_TASK: {"queue": CHECK_QUEUE}},
        task_soft_time_limit=settings.batch_time_budget_s,
        task_time_limit=settings.batch_time_budget_s + GRACE_S,
        broker_transport_options=transport,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        beat_schedule={"reconcile": {"task": RECONCILE_TASK, "schedule": settings.reconcile_interval_s}},
        # In memory: the default scheduler keeps a shelve (pickle) file in the working directory, and a
        # reconcile every minute needs no memory of past runs.
        beat_scheduler="celery.beat:Scheduler",
    )
    return app


def send_checks(app: Celery, messages: list[dict], queue: str) -> None:
    """Sends `item.check` messages (their kwargs) on one queue, over one broker connection."""
    with app.producer_or_acquire() as producer:
        for kwargs in messages:
            app.send_task(CHECK_TASK, kwargs=kwargs, queue=queue, producer=producer)


def enqueuer(app: Celery):
    """The service's `Enqueue` over `app`: one `item.check` message, after `countdown` seconds, on `queue`."""

    def enqueue(kwargs: dict, countdown: float, queue: str) -> None:
        app.send_task(CHECK_TASK, kwargs=kwargs, queue=queue, countdown=countdown or None)

    return enqueue
