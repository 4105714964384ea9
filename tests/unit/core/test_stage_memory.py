"""Out of GPU memory, a stage halves its own runs; after a run of successes at the halved size it grows back, up
to its configured size. And which errors leave a GPU process unusable (sticky CUDA errors) and which do not.

No GPU here: the errors are the very types and messages PyTorch raises for them."""

from __future__ import annotations

import pytest
import torch

from pipeline.core.devices import is_out_of_memory, is_sticky_cuda_error
from pipeline.core.stages.base import GROW_AFTER_RUNS, Stage


class _Crowded(Stage):
    """A stage on a GPU shared with something that holds memory: runs over `room` items run out of memory."""

    name = "crowded"

    def __init__(self, located, room: int):
        super().__init__(located, torch.device("cpu"))
        self.room, self.calls = room, []

    def _load(self) -> None:
        pass

    def run(self, items: list) -> list:
        return self.in_runs(items, self._forward)

    def _forward(self, part: list) -> list:
        self.calls.append(len(part))
        if len(part) > self.room:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [item * 2 for item in part]


@pytest.fixture
def crowded(tiny_detector) -> _Crowded:
    stage = _Crowded(tiny_detector.captioner.located, room=2)
    stage.params["batch_size"] = 8
    return stage


def test_a_halved_stage_grows_back_after_a_run_of_successes(crowded):
    # given a stage that ran out of memory and halved itself to 2 per run
    assert crowded.run(list(range(8))) == [item * 2 for item in range(8)]
    assert crowded.calls[:3] == [8, 4, 2] and crowded.batch_size == 2
    fitted = crowded.calls.count(2)  # the runs that fitted at 2 so far

    # when the memory is free again (the other process left), and runs keep fitting at the halved size
    crowded.room = 8
    crowded.calls.clear()
    crowded.run(list(range(2 * (GROW_AFTER_RUNS - fitted - 1))))
    assert crowded.batch_size == 2  # not one run too early
    crowded.run([0, 1])

    # then it doubles, and doubles again after as many runs, up to the configured size and never beyond
    assert crowded.batch_size == 4
    crowded.run(list(range(4 * GROW_AFTER_RUNS)))
    assert crowded.batch_size == 8 and crowded.memory_limit is None
    crowded.calls.clear()
    crowded.run(list(range(64)))
    assert set(crowded.calls) == {8}


def test_short_runs_and_running_out_again_do_not_grow_it(crowded):
    crowded.run(list(range(8)))
    assert crowded.batch_size == 2
    crowded.room = 8
    for _ in range(3 * GROW_AFTER_RUNS):
        crowded.run([0])  # one image at a time says nothing about whether two fit
    assert crowded.batch_size == 2

    for _ in range(GROW_AFTER_RUNS - 1):
        crowded.run([0, 1])
    crowded.room = 1  # out of memory again before the count was reached: halved, and the count starts over
    crowded.run([0, 1])  # out of memory at 2, then two runs of 1 that fitted: 2 of the runs it takes to grow
    assert crowded.batch_size == 1
    crowded.room = 8
    for _ in range(GROW_AFTER_RUNS - 3):
        crowded.run([0])
    assert crowded.batch_size == 1
    crowded.run([0])
    assert crowded.batch_size == 2


STICKY = [
    torch.AcceleratorError("CUDA error: an illegal memory access was encountered"),
    RuntimeError("CUDA error: device-side assert triggered\nCompile with `TORCH_USE_CUDA_DSA` to enable device-side"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( handle, opa, opb, m, n, k)`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"),
    RuntimeError("CUDA error: unspecified launch failure"),
    RuntimeError("CUDA error: misaligned address"),
    torch.AcceleratorError("an error naming no marker: its type says it"),
    torch.cuda.CudaError(700),
]
NOT_STICKY = [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    torch.AcceleratorError("CUDA error: out of memory"),
    RuntimeError("Expected all tensors to be on the same device, but found at least two devices, cuda:0 and cpu!"),
    ValueError("CUDA error: an illegal memory access was encountered"),  # not raised by torch
    RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x3 and 4x5)"),
]


@pytest.mark.parametrize("error", STICKY, ids=lambda error: type(error).__name__ + ":" + str(error)[:40])
def test_cuda_errors_that_poison_the_process_are_sticky(error):
    assert is_sticky_cuda_error(error)


@pytest.mark.parametrize("error", NOT_STICKY, ids=lambda error: type(error).__name__ + ":" + str(error)[:40])
def test_out_of_memory_and_ordinary_errors_are_not_sticky(error):
    assert not is_sticky_cuda_error(error)


def test_a_sticky_error_is_found_behind_the_exception_that_wraps_it():
    try:
        try:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        except RuntimeError as error:
            raise KeyError("a model library's own error") from error
    except KeyError as wrapped:
        assert is_sticky_cuda_error(wrapped)
    try:
        try:
            raise RuntimeError("CUDA error: device-side assert triggered")
        except RuntimeError:
            raise ValueError("raised while handling it") from None
    except ValueError as hidden:
        assert is_sticky_cuda_error(hidden)  # hidden from the traceback, the device is poisoned all the same
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory."))
