"""Faults a test arms in a GPU process: test-only, and off unless the environment names ITEM_TEST_FAULTS.

A spawned GPU process inherits no monkeypatch, so an integration test that must watch a real process meet a CUDA
error, a model call running past its budget or a thread dying arms the fault as a file, `$ITEM_TEST_FAULTS/<point>`,
whose text says what happens when a process reaches that point:

    cuda <message>     raises torch.AcceleratorError(<message>), the type PyTorch raises for a CUDA error
    sleep <seconds>    sleeps (a model call that runs long)
    raise <message>    raises RuntimeError(<message>) (a bug)

The first process to reach the point takes the file (an atomic rename to `<point>.struck.<pid>`), so a fault
strikes once, whichever process meets it: the replacement runs clean, and the test sees who was struck. The
points: `load` (a GPU process about to load its models), `models` (where worker.gpu.batches runs the detector on
a batch), `store` (each batch the store thread of worker.gpu.loop takes, outside its handling of a batch's
errors). No setting reads this variable, and a deployment never sets it.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger("item.worker")

VARIABLE = "ITEM_TEST_FAULTS"


def strike(point: str) -> None:
    """The fault armed at `point`, if a test armed one and no process took it yet; else nothing."""
    folder = os.environ.get(VARIABLE)
    if not folder:
        return
    armed = Path(folder) / point
    struck = armed.with_name(f"{point}.struck.{os.getpid()}")
    try:
        armed.rename(struck)
    except OSError:  # not armed, or another process took it first
        return
    kind, _, argument = struck.read_text().strip().partition(" ")
    log.warning("test fault at %s: %s %s", point, kind, argument)
    if kind == "sleep":
        time.sleep(float(argument))
    elif kind == "cuda":
        import torch

        raise torch.AcceleratorError(argument)
    elif kind == "raise":
        raise RuntimeError(argument)
    else:
        raise ValueError(f"unknown test fault {kind!r} at {point} (cuda, sleep or raise)")
