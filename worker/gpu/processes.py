"""`item worker`: a supervisor process per host, GPU loop processes under it, and the service's threads.

    item worker (this process: no model library is imported here)
      ├─ GPU loop × concurrency   processes started fresh (spawn), each loading its models, then claiming batches
      ├─ intake thread            `item.check` messages → ledger rows (worker.intake.consumer)
      ├─ deliverer thread         the outbox: callbacks and the results stream (worker.outbox.delivery)
      ├─ reconciler thread        once per deployment (worker.ops.reconciler)
      └─ /metrics                 every process's samples, plus what is read at scrape time

A GPU process that dies is replaced at once, and is never killed for taking long to load its models (the
models are loaded by the process itself, after it started). "ready." is logged once every GPU process has
loaded its models and registered its pipeline version, and the intake is consuming. SIGTERM (or Ctrl-C) stops
the intake first, lets each GPU process finish its batch, then stops.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from pipeline.core.errors import ItemError
from worker.ops import logs
from worker.settings import Settings

log = logging.getLogger("item.worker")

RESTART_BACKOFF_S = (1.0, 60.0)  # a GPU process that keeps dying is restarted after a doubling delay
STABLE_AFTER_S = 60.0  # one that lived this long resets the delay
STOP_GRACE_S = 30.0  # beyond the batch budget, how long a stopping GPU process may take to finish
SETUP_FAILED_STATUS = 2  # as every `item` command that cannot run: a bad model, head or profile


@dataclass
class _GpuProcess:
    index: int
    process: multiprocessing.Process | None = None
    started_at: float = 0.0
    ready: bool = False
    restart_at: float = 0.0
    backoff_s: float = RESTART_BACKOFF_S[0]
    version_id: str | None = None


@dataclass
class Supervisor:
    settings: Settings
    loglevel: str = "INFO"
    intake: bool = True
    reconcile: bool = True
    stopping: threading.Event = field(default_factory=threading.Event)
    exit_status: int = 0

    def run(self) -> int:
        from worker.ledger.store import Ledger
        from worker.ops import exporter
        from worker.ops.reconciler import ReconcilerThread
        from worker.outbox.delivery import Deliverer

        self._context = multiprocessing.get_context("spawn")  # a fresh interpreter: no thread or lock of ours
        self._events = self._context.Queue()
        self._install_signals()
        ledger = Ledger(self.settings.database_url)
        if self.settings.metrics_port:
            exporter.serve(self.settings)
        deliverer = Deliverer(self.settings, ledger)
        deliverer.start()
        reconciler = ReconcilerThread(self.settings, ledger) if self.reconcile else None
        if reconciler:
            reconciler.start()
        self._gpus = [_GpuProcess(index) for index in range(self.settings.worker_concurrency)]
        for gpu in self._gpus:
            self._start(gpu)
        consumer, consuming = self._start_intake(ledger)
        announced = False
        while not self.stopping.is_set():
            self._collect_events()
            self._replace_dead()
            if not announced and all(g.ready for g in self._gpus) and (consumer is None or consumer.ready.is_set()):
                self._announce(consumer is not None)
                announced = True
            self.stopping.wait(0.5)
        self._shut_down(consumer, consuming, deliverer, reconciler)
        return self.exit_status

    # ------------------------------------------------------------------ GPU processes

    def _start(self, gpu: _GpuProcess) -> None:
        gpu.process = self._context.Process(
            target=gpu_main,
            args=(self.settings, gpu.index, self.loglevel, self._events),
            name=f"item-gpu-{gpu.index}",
        )
        gpu.process.start()
        gpu.started_at, gpu.ready = time.monotonic(), False
        log.info("GPU loop %d starting (pid %d): loading its models", gpu.index, gpu.process.pid)

    def _collect_events(self) -> None:
        while True:
            try:
                kind, index, pid, *details = self._events.get_nowait()
            except queue.Empty:
                return
            gpu = self._gpus[index]
            if kind == "unusable":
                code, message = details
                log.critical("GPU loop %d cannot start: [%s] %s; stopping", index, code, message)
                self.exit_status = SETUP_FAILED_STATUS
                self.stopping.set()
            elif kind == "ready" and gpu.process is not None and gpu.process.pid == pid:
                version_id, active = details
                gpu.ready, gpu.version_id = True, version_id
                state = "the active version" if active else "registered, NOT active: `item versions activate` it"
                log.info("GPU loop %d (pid %d) ready: %s, %s", index, pid, version_id, state)

    def _replace_dead(self) -> None:
        now = time.monotonic()
        for gpu in self._gpus:
            process = gpu.process
            if process is not None and not process.is_alive():
                process.join()
                lived = now - gpu.started_at
                if lived >= STABLE_AFTER_S:  # it served a while: replace it at once
                    gpu.backoff_s, delay = RESTART_BACKOFF_S[0], 0.0
                else:  # dying at start-up: wait longer each time, rather than load models in a tight loop
                    delay, gpu.backoff_s = gpu.backoff_s, min(RESTART_BACKOFF_S[1], gpu.backoff_s * 2)
                log.error(
                    "GPU loop %d (pid %d) exited with status %s after %.0fs; replacing it in %.0fs",
                    gpu.index, process.pid, process.exitcode, lived, delay,
                )  # fmt: skip
                gpu.process, gpu.ready, gpu.restart_at = None, False, now + delay
            if gpu.process is None and now >= gpu.restart_at and not self.stopping.is_set():
                self._start(gpu)

    # ------------------------------------------------------------------ intake

    def _start_intake(self, ledger):
        if not self.intake or not self.settings.broker_url:
            return None, None
        from worker.intake.consumer import make_intake
        from worker.intake.filing import Intake

        consumer = make_intake(self.settings, Intake(self.settings, ledger))
        thread = threading.Thread(target=consumer.run, name="item-intake", daemon=True)
        thread.start()
        return consumer, thread

    def _announce(self, intake: bool) -> None:
        versions = sorted({gpu.version_id for gpu in self._gpus if gpu.version_id})
        parts = [f"{len(self._gpus)} GPU loop(s) on {', '.join(versions) or 'no version'}"]
        parts.append("intake on item.checks" if intake else "no intake")
        log.info("item worker ready. %s", "; ".join(parts))

    # ------------------------------------------------------------------ stopping

    def _install_signals(self) -> None:
        def stop(signum, frame) -> None:
            log.info("stopping (signal %d): the intake first, then each GPU loop after its batch", signum)
            self.stopping.set()

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)

    def _shut_down(self, consumer, consuming, deliverer, reconciler) -> None:
        if consumer is not None:
            consumer.stop()
            consuming.join(10)
        for gpu in self._gpus:
            if gpu.process is not None and gpu.process.is_alive():
                gpu.process.terminate()  # SIGTERM: the loop ends after its current batch
        deadline = time.monotonic() + self.settings.batch_time_budget_s + STOP_GRACE_S
        for gpu in self._gpus:
            if gpu.process is not None:
                gpu.process.join(max(0.0, deadline - time.monotonic()))
                if gpu.process.is_alive():
                    log.warning("GPU loop %d did not stop in time; killing it (its lease lets others redo)", gpu.index)
                    gpu.process.kill()
                    gpu.process.join()
        deliverer.stop(timeout=self.settings.callback_timeout_s + 5)
        if reconciler:
            reconciler.stop()
        log.info("item worker stopped")


def gpu_main(settings: Settings, index: int, loglevel: str, events) -> None:
    """A GPU process: load the models, register the version, say so, then claim and run batches until SIGTERM."""
    logs.configure(settings.log_format, loglevel)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the supervisor, which stops us in order
    from worker.gpu.build import build_service
    from worker.gpu.loop import Loop
    from worker.ops import metrics

    try:
        service = build_service(settings)
        detector = service.detector
        detector.load()
        active = service.register_version(activate=settings.activate_on_start)
    except ItemError as error:
        # A missing model, a head for other models: restarting would only fail again. The supervisor stops.
        events.put(("unusable", index, os.getpid(), error.code, error.message))
        sys.exit(SETUP_FAILED_STATUS)
    stages = (detector.captioner, detector.grounder, detector.embedder)
    metrics.models_loaded({stage.name: stage.load_seconds or 0.0 for stage in stages})
    events.put(("ready", index, os.getpid(), service.version_id, active))
    Loop(service, stop=stop).run_forever()
