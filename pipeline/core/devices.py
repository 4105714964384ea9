"""Device and precision choices, made in one place."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from pipeline.core.defaults import PRECISIONS

_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(requested: str = "auto") -> torch.device:
    """`auto` picks CUDA when present, else CPU; anything else is passed to torch as given."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"Device {requested!r} was asked for, but this machine has no usable CUDA device.")
    return device


def effective_precision(requested: str, device: torch.device) -> str:
    """What a stage asked to run at `requested` really runs at on `device`: CPUs have no TF32 and no fast fp16
    matrix products, so those run in fp32 there; bf16 runs on both. The stage version records this answer."""
    if requested not in PRECISIONS:
        raise ValueError(f"Unknown precision {requested!r}; known: {', '.join(PRECISIONS)}.")
    if device.type == "cuda" or requested == "bf16":
        return requested
    return "fp32"


def weight_dtype(precision: str) -> torch.dtype:
    """The dtype of a model's weights when it is loaded at `precision` (TF32 keeps float32 weights)."""
    return _DTYPES[precision]


@contextmanager
def compute_precision(precision: str, device: torch.device) -> Iterator[None]:
    """Runs the block's float32 matrix products at `precision`: TF32 on CUDA, or autocast to bf16/fp16 (weights
    stay float32). The TF32 switch is process-wide in PyTorch, so it is set for the block and put back after."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32" and device.type == "cuda"
    try:
        if precision in ("bf16", "fp16"):
            with torch.autocast(device.type, dtype=_DTYPES[precision]):
                yield
        else:
            yield
    finally:
        matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def is_out_of_memory(error: BaseException) -> bool:
    """A GPU allocation failure, as PyTorch raises it (or as a RuntimeError from older kernels)."""
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


# How the CUDA runtime and its libraries word an error, as PyTorch passes it on (lower case).
_STICKY_MARKERS = (
    "cuda error",  # "CUDA error: an illegal memory access was encountered", "... device-side assert triggered"
    "cuda driver error",
    "cublas_status_",  # "CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasSgemm( ... )`"
    "cudnn error",  # "cuDNN error: CUDNN_STATUS_INTERNAL_ERROR"
    "cudnn_status_",
    "cusolver_status_",
    "triton error [cuda]",
    "device-side assert",
    "illegal memory access",
    "unspecified launch failure",
    "misaligned address",
    "uncorrectable ecc error",
)
# The types PyTorch raises for them (AcceleratorError since 2.8, with the CUDA error code; CudaError from cudart).
_ACCELERATOR_ERRORS = tuple(
    kind for kind in (getattr(torch, "AcceleratorError", None), getattr(torch.cuda, "CudaError", None)) if kind
)


def is_sticky_cuda_error(error: BaseException) -> bool:
    """A CUDA error after which the process's GPU context cannot be trusted (an illegal memory access, a
    device-side assert, a cuBLAS or cuDNN failure): every later call on the device may fail or be wrong, so only
    a fresh process recovers. Out-of-memory is not one: freeing memory and running smaller recovers from it.

    PyTorch raises these as `torch.AcceleratorError` (2.8 and later) or a plain `RuntimeError` naming the error,
    possibly as the cause or context of another exception: the whole chain is read."""
    seen: set[int] = set()
    link: BaseException | None = error
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        if not is_out_of_memory(link):
            if isinstance(link, _ACCELERATOR_ERRORS):
                return True
            text = str(link).lower()
            if isinstance(link, RuntimeError) and any(marker in text for marker in _STICKY_MARKERS):
                return True
        link = link.__cause__ or link.__context__
    return False


def free_gpu_memory() -> None:
    """Returns cached blocks to the driver after an out-of-memory error, so a smaller retry can fit."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
