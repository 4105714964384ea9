"""The Celery app, made from the settings: what `celery -A worker.intake.app worker` and `item worker` run.

    celery -A worker.intake.app worker --gpus 1      # a GPU host: intake, GPU loops, upkeep
    celery -A worker.intake.app worker --gpus 0      # an intake-only host
    celery -A worker.intake.app inspect item         # each worker's GPU loops: version, batches
    celery -A worker.intake.app control shutdown     # a warm shutdown of every worker

JSON is the only content accepted anywhere (messages, results, events: a pickle is never decoded). `item.check`
is acknowledged late, once its ledger row is committed (`worker.intake.task`). The GPU loops and the upkeep
threads (deliveries, reconciler, /metrics) are worker steps (`worker.gpu.step`, `worker.ops.step`), so Celery
supervises them: they start and stop with the worker, and `inspect`, `control`, events and Flower see them.

`app` is built on first access, not at import, so that a bad setting is one clear error naming its variable
(and a module that merely imports this one builds nothing).
"""

from __future__ import annotations

import logging
import math
import sys
from functools import cache

from celery import Celery, signals

from worker.intake.broker import check_queue, transport_options, worker_transport
from worker.settings import CHECK_QUEUE, CHECK_TASK, Settings, SettingsError, load_settings


def create_app(settings: Settings) -> Celery:
    """The app of a deployment: its broker, JSON only, the `item.check` task and the worker's steps."""
    app = Celery("item", broker=settings.broker_url, set_as_current=False)
    app.item_settings = settings
    threads = settings.intake_threads
    app.conf.update(
        accept_content=["json"],
        task_serializer="json",
        result_serializer="json",
        event_serializer="json",
        result_accept_content=["json"],
        task_ignore_result=True,  # results are the ledger's: no result backend
        task_acks_late=True,
        task_queues=[check_queue()],
        task_default_queue=CHECK_QUEUE,
        task_routes={CHECK_TASK: {"queue": CHECK_QUEUE}},
        task_create_missing_queues=False,
        broker_transport=worker_transport(settings),
        broker_transport_options=transport_options(settings),
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker restart is waited out, however long
        worker_pool="threads",  # the task only talks to the ledger (and a setting outranks `--pool`)
        worker_concurrency=threads,
        worker_prefetch_multiplier=max(1, math.ceil(settings.intake_prefetch / threads)),
        worker_send_task_events=True,  # Flower and `celery events` see every item.check
        worker_consumer="worker.intake.consumer:IntakeConsumer",
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
    )
    from worker.gpu.control import register_commands
    from worker.gpu.step import GpuLoops, add_worker_options
    from worker.intake.task import register_check_task
    from worker.intake.tenant_step import TenantQueues
    from worker.ops.step import Upkeep

    register_check_task(app, settings)
    register_commands()
    app.steps["worker"].add(GpuLoops)
    app.steps["worker"].add(Upkeep)
    app.steps["worker"].add(TenantQueues)
    add_worker_options(app)
    _connect_signals(app, settings)
    return app


def _connect_signals(app: Celery, settings: Settings) -> None:
    def set_up_logging(loglevel=None, **_) -> None:
        from worker.ops import logs

        level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else (loglevel or "INFO")
        logs.configure(settings.log_format, str(level).upper())

    def before_the_worker_starts(sender=None, **_) -> None:
        if getattr(sender, "app", None) is app:
            from worker.ops import exporter

            exporter.prepare_multiprocess_dir(settings)  # before any process imports the metrics

    def shutting_down(**_) -> None:
        from worker.intake.task import CheckIntake

        CheckIntake.stopping.set()  # a batch held through a ledger outage is given back to the broker

    signals.setup_logging.connect(set_up_logging, weak=False)
    signals.worker_init.connect(before_the_worker_starts, weak=False)
    signals.worker_shutting_down.connect(shutting_down, weak=False)


def run_celery(app: Celery, argv: list[str]) -> int:
    """`celery ARGV` on `app`, returning its exit status (Celery's own `app.start` drops the worker's)."""
    from celery.bin.celery import celery

    celery.params[0].default = app  # the `-A` option's value, as `app.start` sets it
    try:
        return celery.main(args=argv, standalone_mode=False) or 0
    finally:
        celery.params[0].default = None


@cache
def _app_from_environment() -> Celery:
    try:
        return create_app(load_settings())
    except SettingsError as error:  # one line naming the variable, not a traceback from inside Celery's loader
        print(f"error [{error.code}] {error.message}", file=sys.stderr)
        raise SystemExit(2) from None


def __getattr__(name: str):
    if name == "app":  # `celery -A worker.intake.app ...`
        return _app_from_environment()
    raise AttributeError(name)
