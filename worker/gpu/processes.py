"""One process per GPU, supervised by the Celery worker they run in (through `worker.gpu.step.GpuLoops`).

    celery worker (no model library is imported here; no CUDA touched)
      └─ GPU loop × N   processes started fresh (spawn), each loading its models, then claiming batches

Loop i runs on GPU i (`ITEM_DEVICE=auto` or `cuda`; a worker with more loops than GPUs stops) unless ITEM_DEVICE
names each loop's device (`cuda:0,cuda:2`) or one device for all (worker.gpu.placement). Each process decides
its own, before loading its models: only it imports torch.

A GPU process that dies is replaced at once (after a doubling delay if it keeps dying at start-up), and is
never killed for taking long to load its models: it loads them itself, after it started. A model, head,
profile or device that cannot be used at all stops the worker (exit 2) rather than restarting forever. A process
also ends itself to be replaced, and the log line of its replacement says why (worker.gpu.exits): a batch still in the
models past its budget (the watchdog, 72), a CUDA error that left the device unusable (71), a supervised thread
of it that died (70). Stopping sends each process SIGTERM: it finishes its batch (or gives back what it
prepared), then exits; one still running past the batch budget and a grace is killed. Either way the worker then
gives back any check still `running` under the ended process's leases, claimable at once (a killed batch's attempt
stays counted), so that none waits out a lease nobody renews.

Each process reports over a queue: `ready` once its models are loaded and its version registered, then its
`state` every few seconds (batches, checks, leases held), which `celery inspect item` and `inspect stats` show.
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
from worker.gpu import exits, faults
from worker.ops import logs
from worker.ops.supervise import Supervised
from worker.settings import Settings

log = logging.getLogger("item.worker")

RESTART_BACKOFF_S = (1.0, 60.0)  # a GPU process that keeps dying is restarted after a doubling delay
STABLE_AFTER_S = 60.0  # one that lived this long resets the delay
STOP_GRACE_S = 30.0  # beyond the batch budget, how long a stopping GPU process may take to finish
# When the worker gives back what a dead GPU process held: at once, and again this much later, as its last
# statement may still be running on the database server (a claim sent before it died, committed after).
GIVE_BACK_AFTER_S = (0.0, 5.0)
SETUP_FAILED_STATUS = exits.SETUP_FAILED  # as every `item` command that cannot run: a bad model, head or profile
STATE_EVERY_S = 2.0  # how often a GPU process reports its counters
SUPERVISE_EVERY_S = 0.5
MODEL_THREAD_SWITCH_S = 0.0005  # the GPU process's GIL switch interval (Python's default is 0.005)


@dataclass
class GpuProcess:
    index: int
    process: multiprocessing.Process | None = None
    started_at: float = 0.0
    ready: bool = False
    restart_at: float = 0.0
    backoff_s: float = RESTART_BACKOFF_S[0]
    restarts: int = 0
    version_id: str | None = None
    device: str | None = None
    state: dict = field(default_factory=dict)

    def info(self) -> dict:
        alive = self.process is not None and self.process.is_alive()
        status = "ready" if self.ready and alive else "loading" if alive else "restarting"
        pid = self.process.pid if self.process is not None else None
        return {
            "index": self.index, "pid": pid, "status": status, "version": self.version_id, "device": self.device,
            "restarts": self.restarts, **self.state,
        }  # fmt: skip


class GpuFleet:
    """The GPU processes of one worker, supervised from a thread of its main process."""

    def __init__(self, settings: Settings, count: int, loglevel: str = "INFO", on_unusable=None, on_ready=None):
        self.settings, self.loglevel = settings, loglevel
        self.on_unusable = on_unusable or (lambda: None)  # the worker stops: restarting would only fail again
        self.on_ready = on_ready or (lambda: None)  # every process ready (called again after a replacement)
        self.gpus = [GpuProcess(index) for index in range(count)]
        self.stopping = threading.Event()
        self._context = multiprocessing.get_context("spawn")  # a fresh interpreter: no thread or lock of ours
        self._events = self._context.Queue()
        self._give_backs: list[tuple[float, int]] = []  # (when, pid): give back what a dead GPU process held
        self._thread = Supervised("gpu-supervisor", self._supervise, stopping=self.stopping)

    @property
    def ready(self) -> bool:
        return all(gpu.ready for gpu in self.gpus)

    def start(self) -> None:
        for gpu in self.gpus:
            self._start(gpu)
        self._thread.start()
        if not self.gpus:
            self.on_ready()

    def info(self) -> dict:
        return {"gpu_loops": [gpu.info() for gpu in self.gpus], "ready": self.ready}

    def versions(self) -> list[str]:
        return sorted({gpu.version_id for gpu in self.gpus if gpu.version_id})

    def stop(self, *, grace_s: float | None = None) -> None:
        """SIGTERM to each process, then wait for its batch to end (at most the budget and a grace), else kill; then
        give back what each still held, so that no check waits out a lease of a process that is gone."""
        self.stopping.set()
        self._thread.stop(5)
        for gpu in self.gpus:
            if gpu.process is not None and gpu.process.is_alive():
                log.info("stopping GPU loop %d (pid %d): it finishes the batch in its models and gives back the "
                         "one it prepared", gpu.index, gpu.process.pid)  # fmt: skip
                gpu.process.terminate()
        wait = self.settings.batch_time_budget_s + STOP_GRACE_S if grace_s is None else grace_s
        started = time.monotonic()
        ended = [gpu for gpu in self.gpus if gpu.process is not None]
        for gpu in ended:
            self._end(gpu.index, gpu.process, started + wait)
        # Only a process that said it was ready may have claimed: one still loading its models holds nothing, and a
        # fleet that never served (a refused device) opens no ledger at all.
        served = [gpu.process.pid for gpu in ended if gpu.version_id is not None]
        if served:
            give_back_leases(self.settings, served)
        log.info("GPU loops stopped in %.1fs", time.monotonic() - started)

    @staticmethod
    def _end(index: int, process: multiprocessing.Process, deadline: float) -> None:
        """Waits for GPU loop `index`'s process to end by `deadline`, else kills it."""
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            log.warning("GPU loop %d (pid %d) did not stop in time; killing it", index, process.pid)
            process.kill()
            process.join()
        else:
            log.info("GPU loop %d (pid %d) exited with status %s", index, process.pid, process.exitcode)

    # ------------------------------------------------------------------ supervision

    def _supervise(self) -> None:
        while not self.stopping.wait(SUPERVISE_EVERY_S):
            try:
                self._collect_events()
                self._replace_dead()
                self._give_back_due()  # after the replacements started: a slow ledger delays no GPU process
            except Exception:  # this thread is what keeps the GPU processes alive: it must outlive any bug
                log.exception("supervising the GPU loops failed; carrying on")

    def _start(self, gpu: GpuProcess) -> None:
        gpu.process = self._context.Process(
            target=gpu_main,
            args=(self.settings, gpu.index, len(self.gpus), self.loglevel, self._events),
            name=f"item-gpu-{gpu.index}",
        )
        gpu.process.start()
        gpu.started_at, gpu.ready, gpu.state = time.monotonic(), False, {}
        log.info("GPU loop %d starting (pid %d): loading its models", gpu.index, gpu.process.pid)

    def _collect_events(self) -> None:
        while True:
            try:
                kind, index, pid, *details = self._events.get_nowait()
            except queue.Empty:
                return
            gpu = self.gpus[index]
            current = gpu.process is not None and gpu.process.pid == pid
            if kind == "unusable":
                code, message = details
                log.critical("GPU loop %d cannot start: [%s] %s; stopping", index, code, message)
                self.stopping.set()
                self.on_unusable()
            elif kind == "ready" and current:
                gpu.version_id, active, gpu.device = details
                gpu.ready = True
                state = "the active version" if active else "registered, NOT active: `item versions activate` it"
                log.info("GPU loop %d (pid %d) ready: %s on %s, %s", index, pid, gpu.version_id, gpu.device, state)
                if self.ready:
                    self.on_ready()
            elif kind == "state" and current:
                gpu.state = details[0]

    def _replace_dead(self) -> None:
        now = time.monotonic()
        for gpu in self.gpus:
            process = gpu.process
            if process is not None and not process.is_alive():
                process.join()
                lived = now - gpu.started_at
                if lived >= STABLE_AFTER_S:  # it served a while: replace it at once
                    gpu.backoff_s, delay = RESTART_BACKOFF_S[0], 0.0
                else:  # dying at start-up: wait longer each time, rather than load models in a tight loop
                    delay, gpu.backoff_s = gpu.backoff_s, min(RESTART_BACKOFF_S[1], gpu.backoff_s * 2)
                log.error(
                    "GPU loop %d (pid %d) exited with status %s after %.0fs: %s; replacing it in %.0fs",
                    gpu.index, process.pid, process.exitcode, lived, exits.reason(process.exitcode), delay,
                )  # fmt: skip
                if gpu.ready:  # it may have died holding a batch: hand it back now, not when its lease runs out
                    self._give_backs += [(now + after, process.pid) for after in GIVE_BACK_AFTER_S]
                gpu.process, gpu.ready, gpu.restart_at, gpu.state = None, False, now + delay, {}
                gpu.restarts += 1
            if gpu.process is None and now >= gpu.restart_at and not self.stopping.is_set():
                self._start(gpu)

    def _give_back_due(self) -> None:
        now = time.monotonic()
        due = sorted({pid for when, pid in self._give_backs if when <= now})
        if due:
            self._give_backs = [(when, pid) for when, pid in self._give_backs if when > now]
            give_back_leases(self.settings, due)


def give_back_leases(settings: Settings, pids: list[int]) -> None:
    """Gives back the checks still `running` under the leases of the ended GPU processes `pids` (none after a clean
    drain; a killed one's batch): claimable at once, not after their lease runs out (`claims.give_back_owner`). The
    ledger is opened here, in the worker's main process, only for this (no model library is imported); an outage
    is logged, and the checks then wait out their lease as before."""
    from worker.ledger.claims import give_back_owner, owner_of
    from worker.ledger.store import Ledger

    ledger = Ledger(settings.database_url)
    try:
        for pid in pids:
            with ledger.session() as session:
                given, spent = give_back_owner(session, owner_of(pid), settings.max_attempts)
            _log_given_back(pid, given, spent)
    except Exception:  # the worker is stopping: nothing here may keep it from exiting
        log.warning("could not give back the checks of GPU processes %s; they wait out their lease", pids,
                    exc_info=True)  # fmt: skip
    finally:
        ledger.dispose()


def _log_given_back(pid: int, given: int, spent: int) -> None:
    if given:
        log.warning("gave back %d checks GPU process %d still held: claimable now (attempt counted)", given, pid)
    if spent:
        log.warning("%d checks GPU process %d still held had used every attempt: the reconciler fails them",
                    spent, pid)  # fmt: skip
    if not given and not spent:
        log.info("GPU process %d released its leases: no check left running under it", pid)


def gpu_main(settings: Settings, index: int, loops: int, loglevel: str, events) -> None:
    """GPU loop `index` of `loops`: take its device, load the models, register the version, say so, then claim and
    run batches until SIGTERM."""
    logs.configure(settings.log_format, loglevel)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the worker, which stops us in order
    from worker.gpu.build import build_service
    from worker.gpu.loop import Loop
    from worker.ops import metrics

    try:
        settings = loop_settings(settings, index, loops)
        service = build_service(settings)
        detector = service.detector
        faults.strike("load")  # tests only (worker.gpu.faults): a model load that takes long
        detector.load()
        active = service.register_version(activate=settings.activate_on_start)
    except ItemError as error:
        events.put(("unusable", index, os.getpid(), error.code, error.message))
        sys.exit(SETUP_FAILED_STATUS)
    stages = (detector.captioner, detector.grounder, detector.embedder)
    metrics.models_loaded({stage.name: stage.load_seconds or 0.0 for stage in stages})
    events.put(("ready", index, os.getpid(), service.version_id, active, str(detector.device)))
    # The model thread waits on the device with the GIL released (a CUDA synchronisation; the simulated device's
    # sleep) while the prefetch and store threads run Python. When the device is done it must get the GIL back,
    # and by default another thread keeps it up to 5 ms before being asked to yield: time the GPU sits idle, at
    # every one of a batch's few dozen waits. A shorter interval hands it back sooner (README, "Keeping a GPU busy").
    # Models on the CPU never wait like that, and more switching only slows their threads down.
    if service.models_off_the_cpu:
        sys.setswitchinterval(MODEL_THREAD_SWITCH_S)
    loop = Loop(service, stop=stop)
    Supervised("gpu-state", lambda: _report_state(loop, index, events), stopping=stop, on_death="exit").start()
    loop.run_forever()
    # Every batch is stored or given back and the presence row deleted: nothing is left to do but exit. The
    # interpreter's own shutdown (joining idle reading threads, tearing down the model libraries) took seconds of
    # a drain and, after a device failure, may hang on a broken CUDA context, so it is skipped.
    logging.shutdown()
    os._exit(loop.exit_status)


def loop_settings(settings: Settings, index: int, loops: int) -> Settings:
    """The settings of GPU loop `index` of `loops`: ITEM_DEVICE resolved to this loop's one device (`cuda:1`).

    Raises DeviceUnavailableError when the devices this process sees cannot serve the loops as asked.
    """
    from worker.gpu.placement import cuda_device_count, loop_device

    device = loop_device(settings.device, index, loops, cuda_device_count())
    return settings.model_copy(update={"device": device})


def _report_state(loop, index: int, events) -> None:
    while not loop.stop.wait(STATE_EVERY_S):
        events.put(("state", index, os.getpid(), loop.counters()))
