"""Which device each GPU loop of a worker runs on: one GPU per loop unless the operator names the sharing.

`ITEM_DEVICE` (settings.device) is read once per worker, but a worker runs N GPU loops, each loading every model:
two loops on one GPU double its memory and fight over it. So `auto` and `cuda` give loop i the GPU `cuda:i` and
refuse more loops than GPUs; a comma list (`cuda:0,cuda:2`) names each loop's device; a single explicit device
(`cuda:1`, `cpu`) is shared by every loop, as asked. Without CUDA, `auto` is the CPU for every loop.

The decision is made in each GPU process, before it loads its models: the worker's main process never imports
torch. A refusal is a `DeviceUnavailableError`, which the GPU process reports as unusable, so the worker stops
(exit 2) rather than restarting a loop that can only fail again.
"""

from __future__ import annotations

import re

from pipeline.core.errors import ItemError

# One torch device as torch writes it: a type (cpu, cuda, mps, xpu...) and an optional index.
_DEVICE = re.compile(r"^[a-z][a-z0-9_]*(:\d+)?$")
_PER_LOOP = ("auto", "cuda")  # the values that mean "one GPU per loop"
_WRITE = "write auto, cpu, cuda, cuda:N, or one device per GPU loop such as cuda:0,cuda:1"


class DeviceUnavailableError(ItemError):
    """The devices asked for are not there, or too few for the loops. Configuration: no retry can help."""

    code = "device.unavailable"


def device_entries(requested: str) -> list[str]:
    """The devices written in `requested`: one (`auto`, `cpu`, `cuda:1`) or a comma list, trimmed (`cuda:0, cuda:2`).

    Torch-free, so the settings check the text where it is read. Raises ValueError saying what is wrong.
    """
    entries = [entry.strip() for entry in requested.split(",")]
    if any(not entry for entry in entries):
        raise ValueError(f"an empty entry: {_WRITE}")
    for entry in entries:
        if not _DEVICE.match(entry):
            raise ValueError(f"{entry!r} is not a device: {_WRITE}")
    if len(entries) > 1 and any(entry in _PER_LOOP for entry in entries):
        raise ValueError("a list names each loop's device with its index (cuda:0), never auto or cuda")
    return entries


def loop_device(requested: str, index: int, loops: int, cuda_devices: int) -> str:
    """The device of GPU loop `index` of `loops`, when this process sees `cuda_devices` CUDA devices (0: none)."""
    if not 0 <= index < loops:
        raise ValueError(f"loop {index} is not one of {loops}")
    entries = device_entries(requested)
    if len(entries) > 1:
        return _listed(requested, entries, index, loops, cuda_devices)
    (device,) = entries
    if device == "auto" and cuda_devices == 0:
        return "cpu"  # every loop on the CPU: slow, but what a machine without CUDA has (and the tests use)
    if device in _PER_LOOP:
        return _one_gpu_each(requested, index, loops, cuda_devices)
    _check_index(requested, device, cuda_devices)
    return device  # named explicitly: every loop shares it, as asked


def _one_gpu_each(requested: str, index: int, loops: int, cuda_devices: int) -> str:
    if cuda_devices == 0:
        raise DeviceUnavailableError(f"ITEM_DEVICE={requested} needs a CUDA device, but this worker sees none")
    if loops > cuda_devices:
        shared = ",".join(["cuda:0"] * loops)
        raise DeviceUnavailableError(
            f"ITEM_DEVICE={requested} runs one GPU loop per GPU, but this worker has {_count(loops, 'GPU loop')} and "
            f"sees {_count(cuda_devices, 'CUDA device')}: lower ITEM_WORKER_CONCURRENCY (--concurrency) to "
            f"{cuda_devices}, or name each loop's device, e.g. ITEM_DEVICE={shared} to share one GPU on purpose"
        )
    return f"cuda:{index}"


def _listed(requested: str, entries: list[str], index: int, loops: int, cuda_devices: int) -> str:
    if len(entries) < loops:
        raise DeviceUnavailableError(
            f"ITEM_DEVICE={requested} names {_count(len(entries), 'device')} for {_count(loops, 'GPU loop')}: name "
            f"one per loop, or lower ITEM_WORKER_CONCURRENCY (--concurrency) to {len(entries)}"
        )
    for entry in entries[:loops]:  # every loop checks them all, so none loads its models for a worker that stops
        _check_index(requested, entry, cuda_devices)
    return entries[index]


def _check_index(requested: str, device: str, cuda_devices: int) -> None:
    kind, _, number = device.partition(":")
    if kind != "cuda" or int(number or 0) < cuda_devices:
        return
    if cuda_devices == 0:
        raise DeviceUnavailableError(f"ITEM_DEVICE={requested} asks for {device}, but this worker sees no CUDA device")
    seen = "cuda:0" if cuda_devices == 1 else f"cuda:0 to cuda:{cuda_devices - 1}"
    raise DeviceUnavailableError(
        f"ITEM_DEVICE={requested} asks for {device}, but this worker sees {_count(cuda_devices, 'CUDA device')}, "
        f"{seen} (CUDA_VISIBLE_DEVICES numbers the ones it shows from 0)"
    )


def _count(number: int, thing: str) -> str:
    return f"{number} {thing}" + ("" if number == 1 else "s")


def cuda_device_count() -> int:
    """How many CUDA devices this process sees (CUDA_VISIBLE_DEVICES applies): 0 when CUDA is unavailable."""
    import torch  # here, in the GPU process: the worker's main process never imports torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
