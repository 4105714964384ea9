"""Celery tasks: thin. Each calls the process's `CheckService` and returns.

`worker_app(settings)` is called once, by `item worker`, in the process that forks the pool: the settings it is
given (environment and command line) are the ones every pool process inherits. The service (ledger engine,
models) is built in each pool process after the fork, in `worker_process_init`: CUDA must never be touched in
the parent that forks.
"""

from __future__ import annotations

import logging
import os

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown

from worker import metrics
from worker.celery_app import RECONCILE_TASK, enqueuer, make_celery
from worker.delivery import Deliverer
from worker.service import INFRASTRUCTURE_ERRORS, CheckService
from worker.settings import CHECK_TASK, Settings

log = logging.getLogger("item.worker")


class _Process:
    """What this worker process holds: the settings and app given at start-up, the service built after fork."""

    settings: Settings | None = None
    app: Celery | None = None
    service: CheckService | None = None
    deliverer: Deliverer | None = None  # this process's sender of results (callbacks, results stream)


def worker_app(settings: Settings) -> Celery:
    """The Celery app of `item worker`, with the check and reconcile tasks, bound to these settings."""
    app = make_celery(settings)
    app.task(
        name=CHECK_TASK,
        bind=True,
        autoretry_for=INFRASTRUCTURE_ERRORS,
        retry_backoff=2,
        retry_backoff_max=300,
        retry_jitter=True,
        max_retries=20,
    )(check)
    app.task(name=RECONCILE_TASK)(reconcile)
    _Process.settings, _Process.app = settings, app
    return app


def service() -> CheckService:
    if _Process.service is None:
        if _Process.settings is None:
            raise RuntimeError("worker_app(settings) must be called before the tasks run")
        from worker.runtime import build_service

        _Process.service = build_service(_Process.settings, enqueue=enqueuer(_Process.app))
    return _Process.service


@worker_process_init.connect
def _load_models_after_fork(**_) -> None:
    svc = service()
    _Process.deliverer = Deliverer(svc.settings, svc.ledger)
    _Process.deliverer.start()  # its own thread: a slow callback receiver never holds up a check
    detector = svc.detector
    detector.load()
    stages = (detector.captioner, detector.grounder, detector.embedder)
    metrics.models_loaded({stage.name: stage.load_seconds or 0.0 for stage in stages})


@worker_process_shutdown.connect
def _stop_delivery(**_) -> None:
    # A send in flight gets to record its outcome; otherwise its lease runs out and it is sent a second time.
    deliverer = _Process.deliverer
    if deliverer is not None:
        deliverer.stop(timeout=deliverer.settings.callback_timeout_s + 5)


@worker_process_shutdown.connect
def _forget_metrics_of_dead_process(pid: int | None = None, **_) -> None:
    # Live gauges (workers ready, GPU memory) must stop counting a process that is gone.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


def check(self, external_id: str, image: dict, check_id: str | None = None, callback_url: str | None = None) -> None:
    svc = service()
    try:
        svc.receive(external_id, image, check_id, callback_url)
    except SoftTimeLimitExceeded:
        log.error("check batch ran past its time budget; its checks will be retried")
        svc.fail_batch_on_timeout(svc.current_batch)


def reconcile() -> int:
    return service().reconcile()
