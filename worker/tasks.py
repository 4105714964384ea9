"""Celery tasks: thin. Each builds nothing itself; it calls the process's `CheckService` and returns.

The service (ledger engine, models) is built once per worker process, after the fork, in
`worker_process_init`: CUDA must never be touched in the parent that forks.
"""

from __future__ import annotations

import logging
import os

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_process_shutdown

from worker import metrics
from worker.celery_app import RECONCILE_TASK, app
from worker.delivery import Deliverer
from worker.service import INFRASTRUCTURE_ERRORS
from worker.settings import CHECK_TASK, Settings

log = logging.getLogger("item.worker")
_service = None
_deliverer = None  # this process's sender of results (callbacks, results stream)


def service():
    global _service
    if _service is None:
        from worker.runtime import build_service

        _service = build_service(Settings(), enqueue=send_check)
    return _service


@worker_process_init.connect
def _load_models_after_fork(**_) -> None:
    global _deliverer
    _deliverer = Deliverer(service().settings, service().ledger)
    _deliverer.start()  # its own thread: a slow callback receiver never holds up a check
    detector = service().detector
    detector.load()
    stages = (detector.captioner, detector.grounder, detector.embedder)
    metrics.models_loaded({stage.name: stage.load_seconds or 0.0 for stage in stages})


@worker_process_shutdown.connect
def _stop_delivery(**_) -> None:
    # A send in flight gets to record its outcome; otherwise its lease runs out and it is sent a second time.
    if _deliverer is not None:
        _deliverer.stop(timeout=_deliverer.settings.callback_timeout_s + 5)


@worker_process_shutdown.connect
def _forget_metrics_of_dead_process(pid: int | None = None, **_) -> None:
    # Live gauges (workers ready, GPU memory) must stop counting a process that is gone.
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


def send_check(kwargs: dict, countdown: float, queue: str) -> None:
    app.send_task(CHECK_TASK, kwargs=kwargs, queue=queue, countdown=countdown or None)


@app.task(
    name=CHECK_TASK,
    bind=True,
    autoretry_for=INFRASTRUCTURE_ERRORS,
    retry_backoff=2,
    retry_backoff_max=300,
    retry_jitter=True,
    max_retries=20,
)
def check(self, external_id: str, image: dict, check_id: str | None = None, callback_url: str | None = None) -> None:
    svc = service()
    try:
        svc.receive(external_id, image, check_id, callback_url)
    except SoftTimeLimitExceeded:
        log.error("check batch ran past its time budget; its checks will be retried")
        svc.fail_batch_on_timeout(svc.current_batch)


@app.task(name=RECONCILE_TASK)
def reconcile() -> int:
    return service().reconcile()
