"""How a GPU process ends, by its exit status, and what the GPU step (worker.gpu.processes) says of each when it
replaces the process. Statuses from sysexits' range, as supervised threads use (worker.ops.supervise)."""

from __future__ import annotations

import signal

from worker.ops.supervise import EXIT_STATUS as THREAD_DIED  # 70: a supervised thread died

SETUP_FAILED = 2  # as every `item` command that cannot run: a bad model, head or profile; the worker stops
GPU_FAULT = 71  # a CUDA error left the device unusable (not out-of-memory): its batch is retried as gpu.fault
WATCHDOG = 72  # a batch stayed in the models (or in preparing) past its time budget: retried as check.timeout

_WORDS = {
    0: "it stopped",
    SETUP_FAILED: "its models, head or profile cannot be used",
    THREAD_DIED: "one of its threads died (item_thread_deaths_total; traceback above); what it held is given back",
    GPU_FAULT: "a CUDA error left its GPU unusable; its batch was retried as gpu.fault",
    WATCHDOG: "a batch ran past its time budget; its checks were retried as check.timeout",
}


def reason(status: int | None) -> str:
    """Why a GPU process ended, in words, from its exit status (negative: the signal that killed it)."""
    if status in _WORDS:
        return _WORDS[status]
    if status is not None and status < 0:
        try:
            name = signal.Signals(-status).name
        except ValueError:
            name = f"signal {-status}"
        cause = " (the kernel's out-of-memory killer, or a person)" if -status == signal.SIGKILL else ""
        return f"it was killed by {name}{cause}; what it held is given back"
    return "it crashed (traceback above); what it held is given back"
