"""The Celery worker step that runs the GPU loops: `celery -A worker.intake.app worker --gpus N`.

A worker step (not a consumer step: those restart on every broker reconnect) starts with the worker and stops
with it. On start it spawns the GPU processes and returns at once, so no start-up limit ever meets a slow model
load; on a warm shutdown (SIGTERM, `celery control shutdown`) each process finishes or gives back its batch
before the worker exits. `--gpus 0` makes an intake-only worker; `--no-intake` a worker that takes no messages
(it still answers `inspect` and `control`).

"item worker ready." is logged once every GPU process has loaded its models and registered its version, and the
consumer is taking messages: from then on `item submit` and platforms' messages are served.
"""

from __future__ import annotations

import logging
import threading

import click
from celery import bootsteps, signals
from celery.worker import state as worker_state

from worker.settings import CHECK_QUEUE, Settings

log = logging.getLogger("item.worker")


def add_worker_options(app) -> None:
    app.user_options["worker"].add(
        click.Option(["--gpus"], type=click.IntRange(min=0), default=None,
                     help="GPU loop processes, one per GPU; 0: intake only [env ITEM_WORKER_CONCURRENCY].")
    )  # fmt: skip
    app.user_options["worker"].add(
        click.Option(["--no-intake"], is_flag=True, default=False, help="Take no item.check messages.")
    )
    app.user_options["worker"].add(
        click.Option(["--no-reconcile"], is_flag=True, default=False, help="Never run the deployment's reconciler.")
    )


class GpuLoops(bootsteps.StartStopStep):
    label = "item GPU loops"
    requires = ("celery.worker.components:Pool",)

    def __init__(self, worker, gpus: int | None = None, no_intake: bool = False, **kwargs):
        super().__init__(worker, **kwargs)
        settings: Settings = worker.app.item_settings
        count = settings.worker_concurrency if gpus is None else gpus
        self.intake = not no_intake
        if no_intake:
            worker.app.amqp.queues.deselect(CHECK_QUEUE)
        self.fleet = None
        self._count, self._settings = count, settings
        self._consuming = threading.Event()
        self._announced = threading.Lock()
        worker.item_gpus = self  # for `celery inspect item`

    def create(self, worker):
        from worker.gpu.processes import GpuFleet

        level = logging.getLevelName(logging.getLogger("item").getEffectiveLevel())
        self.fleet = GpuFleet(self._settings, self._count, level, on_unusable=_stop_worker, on_ready=self._announce)
        signals.worker_ready.connect(self._worker_ready, weak=False)
        signals.worker_shutdown.connect(_exiting, weak=False)
        return self

    def start(self, worker) -> None:
        from worker.ops import metrics
        from worker.ops.supervise import watch

        metrics.GPU_LOOPS.set(self._count)  # which workers should have models loaded (alerts: ItemWorkerDown)
        self.fleet.start()
        watch("gpu-loops", lambda: self.fleet.ready and not self.fleet.stopping.is_set())
        if self.intake:
            watch("intake", lambda: _consuming(worker))

    def stop(self, worker) -> None:
        log.info("stopping the GPU loops: each finishes or gives back its batch, then releases its leases")
        self.fleet.stop()

    def terminate(self, worker) -> None:  # a cold shutdown: no waiting for batches (their checks are given back)
        self.fleet.stop(grace_s=5.0)

    def info(self, worker) -> dict:
        return {"item": self.state()}

    def state(self) -> dict:
        from worker import __version__

        fleet = self.fleet.info() if self.fleet else {"gpu_loops": [], "ready": False}
        return {"version": __version__, "intake": self.intake, **fleet}

    def _worker_ready(self, sender=None, **_) -> None:
        self._consuming.set()
        if self.fleet is not None and self.fleet.ready:
            self._announce()

    def _announce(self) -> None:
        if not self._consuming.is_set() or not self._announced.acquire(blocking=False):
            return
        versions = ", ".join(self.fleet.versions()) or "no version"
        intake = "intake on item.checks" if self.intake else "no intake"
        log.info("item worker ready. %d GPU loop(s) on %s; %s", len(self.fleet.gpus), versions, intake)


def _consuming(worker) -> bool:
    """The consumer runs (between a lost broker connection and its return, it does not: no message is taken)."""
    consumer = getattr(worker, "consumer", None)
    blueprint = getattr(consumer, "blueprint", None)
    return blueprint is not None and blueprint.state == bootsteps.RUN


def _exiting(sender=None, **_) -> None:
    """The last line of a drain: every step stopped (intake, GPU loops, upkeep); the process exits next."""
    log.info("item worker stopped; exiting (status %s)", getattr(sender, "exitcode", None) or 0)


def _stop_worker() -> None:
    """A model, head or profile that cannot work: the worker stops, with the status of a setup failure."""
    from worker.gpu.processes import SETUP_FAILED_STATUS

    worker_state.should_stop = SETUP_FAILED_STATUS
