"""`celery inspect item`: each worker's GPU loops as Celery's remote control reports them.

    celery -A worker.intake.app inspect item
    -> item-1234@gpu-host-3: {"version": "0.1.0", "intake": true, "ready": true,
         "gpu_loops": [{"index": 0, "pid": 1301, "status": "ready", "version": "pv-…", "device": "cuda:0",
                        "restarts": 0, "batches": 412, "checks": 3290, "leases": 2}]}

`celery inspect stats` carries the same object under "item".
"""

from __future__ import annotations

from celery.worker.control import inspect_command

_registered = False


def register_commands() -> None:
    """Registers the command once per process (the registry is Celery's, global to the process)."""
    global _registered
    if not _registered:
        inspect_command(name="item")(_item)
        _registered = True


def _item(state) -> dict:
    """The GPU loops of this worker: version, device, batches, checks and leases per loop."""
    step = getattr(state.consumer.controller, "item_gpus", None)
    return step.state() if step is not None else {"gpu_loops": [], "ready": False}
