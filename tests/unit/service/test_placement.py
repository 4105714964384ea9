"""One GPU loop per GPU: which device each loop of a worker takes (worker.gpu.placement), checked where ITEM_DEVICE
is read (the settings) and where the loop starts (gpu_main, before its models load), so a worker with more loops
than GPUs stops with `device.unavailable` instead of piling every loop onto cuda:0."""

from __future__ import annotations

import logging
import queue
import signal
import threading

import pytest
import torch

from worker.gpu.placement import DeviceUnavailableError, device_entries, loop_device
from worker.gpu.processes import SETUP_FAILED_STATUS, GpuFleet, gpu_main, loop_settings
from worker.settings import Settings, SettingsError, load_settings


def devices(requested: str, loops: int, cuda_devices: int) -> list[str]:
    """The device of every loop of a worker, as each of its GPU processes decides it."""
    return [loop_device(requested, index, loops, cuda_devices) for index in range(loops)]


def refusal(requested: str, loops: int, cuda_devices: int) -> str:
    """The message every loop refuses with (each decides alone: none may load its models for a doomed worker)."""
    messages = set()
    for index in range(loops):
        with pytest.raises(DeviceUnavailableError) as refused:
            loop_device(requested, index, loops, cuda_devices)
        assert refused.value.code == "device.unavailable"
        messages.add(refused.value.message)
    (message,) = messages
    return message


# ------------------------------------------------------------------ the rule


def test_auto_gives_each_loop_its_own_gpu():
    assert devices("auto", 4, cuda_devices=4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert devices("auto", 2, cuda_devices=4) == ["cuda:0", "cuda:1"]  # the GPUs past the loops stay idle
    assert devices("auto", 1, cuda_devices=1) == ["cuda:0"]


def test_auto_refuses_more_loops_than_gpus_and_says_what_to_do():
    message = refusal("auto", 2, cuda_devices=1)
    assert "2 GPU loops" in message and "1 CUDA device" in message
    assert "ITEM_WORKER_CONCURRENCY" in message and "--concurrency) to 1" in message
    assert "ITEM_DEVICE=cuda:0,cuda:0" in message  # how to share one GPU on purpose
    assert "4 GPU loops and sees 2 CUDA devices" in refusal("auto", 4, cuda_devices=2)


def test_auto_without_cuda_runs_every_loop_on_the_cpu():
    assert devices("auto", 2, cuda_devices=0) == ["cpu", "cpu"]


def test_cuda_is_one_gpu_per_loop_and_needs_cuda():
    assert devices("cuda", 2, cuda_devices=2) == ["cuda:0", "cuda:1"]
    assert "2 GPU loops and sees 1 CUDA device" in refusal("cuda", 2, cuda_devices=1)
    assert "needs a CUDA device" in refusal("cuda", 1, cuda_devices=0)


def test_a_list_names_each_loops_device():
    assert devices("cuda:0, cuda:2", 2, cuda_devices=4) == ["cuda:0", "cuda:2"]
    assert devices("cuda:0,cuda:0", 2, cuda_devices=1) == ["cuda:0", "cuda:0"]  # sharing, on purpose
    assert devices("cuda:1,cpu", 2, cuda_devices=2) == ["cuda:1", "cpu"]
    assert devices("cuda:3,cuda:2,cuda:1", 2, cuda_devices=4) == ["cuda:3", "cuda:2"]  # entries past the loops unused


def test_a_list_refuses_too_few_entries_and_absent_gpus():
    message = refusal("cuda:0,cuda:1", 3, cuda_devices=4)
    assert "names 2 devices for 3 GPU loops" in message and "--concurrency) to 2" in message
    message = refusal("cuda:0,cuda:2", 2, cuda_devices=2)  # loop 0's own GPU is there, but the worker would stop
    assert "asks for cuda:2" in message and "2 CUDA devices, cuda:0 to cuda:1" in message
    assert "no CUDA device" in refusal("cuda:0,cuda:1", 2, cuda_devices=0)


def test_one_named_device_is_shared_by_every_loop():
    assert devices("cuda:1", 3, cuda_devices=2) == ["cuda:1"] * 3
    assert devices("cuda:0", 2, cuda_devices=1) == ["cuda:0"] * 2
    assert "asks for cuda:2" in refusal("cuda:2", 2, cuda_devices=2)
    assert "asks for cuda:1" in refusal("cuda:1", 1, cuda_devices=1)
    assert "no CUDA device" in refusal("cuda:0", 1, cuda_devices=0)


def test_cpu_is_the_cpu_for_every_loop_whatever_the_gpus():
    assert devices("cpu", 3, cuda_devices=0) == ["cpu"] * 3
    assert devices("cpu", 2, cuda_devices=4) == ["cpu"] * 2


# ------------------------------------------------------------------ the settings


def test_the_settings_take_a_list_and_write_it_without_spaces():
    assert Settings(device=" cuda:0 , cuda:2 ").device == "cuda:0,cuda:2"
    assert Settings(device="cuda:1").device == "cuda:1"
    assert Settings().device == "auto"
    assert device_entries("cuda:0, cuda:1") == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize(
    ("written", "why"),
    [
        ("cuda:0,,cuda:1", "an empty entry"),
        ("cuda:0,", "an empty entry"),
        ("", "an empty entry"),
        ("cuda:x", "'cuda:x' is not a device"),
        ("gpu 1", "'gpu 1' is not a device"),
        ("cuda:0;cuda:1", "is not a device"),
        ("auto,cuda:1", "never auto or cuda"),
        ("cuda,cuda", "never auto or cuda"),
    ],
)
def test_the_settings_refuse_a_malformed_device_naming_the_variable(written, why):
    with pytest.raises(SettingsError) as refused:
        load_settings(device=written)
    assert f"ITEM_DEVICE={written}: " in refused.value.message and why in refused.value.message


# ------------------------------------------------------------------ the GPU process


@pytest.fixture
def cuda_devices(monkeypatch):
    """Makes torch in this process report `n` CUDA devices (0: CUDA unavailable), as a GPU host would."""

    def visible(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)

    return visible


def test_each_loop_gets_settings_for_its_own_device(cuda_devices):
    cuda_devices(4)
    settings = Settings(device="auto", batch_size=3)
    chosen = [loop_settings(settings, index, 4) for index in range(4)]
    assert [one.device for one in chosen] == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    assert all(one.batch_size == 3 for one in chosen) and settings.device == "auto"  # the worker's own unchanged
    cuda_devices(0)
    assert loop_settings(settings, 1, 2).device == "cpu"


def test_a_loop_refuses_to_start_on_too_few_gpus(cuda_devices):
    cuda_devices(1)
    with pytest.raises(DeviceUnavailableError, match="2 GPU loops and sees 1 CUDA device"):
        loop_settings(Settings(device="auto"), 1, 2)


@pytest.fixture
def gpu_process_side_effects():
    """gpu_main sets up its process (signals, the root logger); run in this one, those are put back after."""
    signals = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    root, ours = logging.getLogger(), logging.getLogger("item")
    handlers, levels = list(root.handlers), (root.level, ours.level)
    yield
    for number, handler in signals.items():
        signal.signal(number, handler)
    root.handlers[:] = handlers
    root.setLevel(levels[0])
    ours.setLevel(levels[1])


def test_gpu_main_reports_too_few_gpus_as_unusable_before_loading_models(cuda_devices, gpu_process_side_effects):
    # With no head set, a loop that went on to build its models would report head.missing instead.
    cuda_devices(1)
    events = queue.Queue()
    with pytest.raises(SystemExit) as exited:
        gpu_main(Settings(device="auto", log_format="text"), 1, 2, "INFO", events)
    assert exited.value.code == SETUP_FAILED_STATUS
    kind, index, _pid, code, message = events.get_nowait()
    assert (kind, index, code) == ("unusable", 1, "device.unavailable") and "2 GPU loops" in message


def test_a_fleet_whose_loops_cannot_all_have_a_device_stops(caplog):
    # Real spawned GPU processes: the fleet hands each its index and the loop count; two devices for three loops
    # is refused on any host, with or without GPUs.
    unusable = threading.Event()
    fleet = GpuFleet(Settings(device="cpu,cpu", log_format="text"), 3, on_unusable=unusable.set)
    fleet.start()
    try:
        assert unusable.wait(120), "no GPU loop reported the devices unusable"
    finally:
        fleet.stop(grace_s=30)
    refusals = [record.getMessage() for record in caplog.records if record.levelno == logging.CRITICAL]
    assert refusals and all("[device.unavailable]" in line and "2 devices for 3 GPU loops" in line for line in refusals)
    assert not any(gpu.ready for gpu in fleet.gpus)  # the others were stopped with it, still starting
