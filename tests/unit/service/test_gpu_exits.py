"""What the GPU step says when it replaces a GPU process, and the test-only fault injector being off by default."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from worker.gpu import exits, faults
from worker.ops import supervise


def test_each_way_a_gpu_process_ends_has_its_own_status_and_words():
    statuses = (exits.SETUP_FAILED, exits.THREAD_DIED, exits.GPU_FAULT, exits.WATCHDOG)
    assert len(set(statuses)) == 4 and exits.THREAD_DIED == supervise.EXIT_STATUS
    assert "gpu.fault" in exits.reason(exits.GPU_FAULT)
    assert "check.timeout" in exits.reason(exits.WATCHDOG)
    assert "threads died" in exits.reason(exits.THREAD_DIED)
    assert "SIGKILL" in exits.reason(-signal.SIGKILL) and "out-of-memory killer" in exits.reason(-signal.SIGKILL)
    assert "SIGSEGV" in exits.reason(-signal.SIGSEGV)
    assert "crashed" in exits.reason(1)


def test_no_fault_strikes_unless_a_test_arms_one(tmp_path, monkeypatch):
    monkeypatch.delenv(faults.VARIABLE, raising=False)
    (tmp_path / "models").write_text("raise armed, but no folder named")
    faults.strike("models")  # nothing: the variable is not set

    monkeypatch.setenv(faults.VARIABLE, str(tmp_path))
    faults.strike("store")  # nothing armed there
    (tmp_path / "models").write_text("cuda CUDA error: an illegal memory access was encountered")
    with pytest.raises(torch.AcceleratorError, match="illegal memory access"):
        faults.strike("models")
    faults.strike("models")  # once only: the file was taken
    assert [path.name for path in tmp_path.iterdir()] == [f"models.struck.{os.getpid()}"]
