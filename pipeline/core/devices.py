"""Device and precision choices, made in one place."""

from __future__ import annotations

import torch


def resolve_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is passed to torch as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {requested!r} was asked for, but this machine has no usable CUDA device.")
    return device


def half_dtype(device: torch.device) -> torch.dtype:
    """Half precision on CUDA (where it is fast and the models were trained for it), float32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32
