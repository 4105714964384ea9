"""What every stage shares: a declared identity, a version string, and a model loaded once, lazily."""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar

import torch

from pipeline.core.devices import effective_precision, free_gpu_memory, is_out_of_memory
from pipeline.core.errors import ModelLoadError
from pipeline.core.model_store import LocatedModel

GROW_AFTER_RUNS = 20  # runs in a row that fitted at a size halved for memory before the size is doubled again


class Stage(ABC):
    name: ClassVar[str]
    # Bump when a code change alters this stage's outputs for the same model and parameters: the version
    # string changes with it, so artifacts stored under the old behaviour are not reused.
    implementation: ClassVar[int] = 1
    # Parameters that change speed or memory but not results; kept out of the version so tuning them
    # does not throw away stored artifacts.
    runtime_params: ClassVar[frozenset[str]] = frozenset({"batch_size", "static_cache"})
    # Images (or texts) per model call when the spec names no `batch_size`: each stage its own, whatever the size
    # of the batch of checks, since their memory per image differs by orders of magnitude.
    default_batch_size: ClassVar[int] = 64
    # The precision a stage runs at unless its spec or the caller names another; None for a stage without a model.
    # It enters the version as the precision really used on this device, since it changes the outputs.
    default_precision: ClassVar[str | None] = "fp32"

    def __init__(self, model: LocatedModel, device: torch.device, precision: str | None = None):
        self.located = model
        self.params: dict[str, Any] = dict(model.spec.params)
        self.device = device
        requested = precision or self.params.get("precision") or self.default_precision
        if requested is not None:
            self.params["precision"] = effective_precision(requested, device)
        self.load_seconds: float | None = None
        self.memory_limit: int | None = None  # runs are this small since the GPU ran out of memory (None: not)
        self._fitted_runs = 0  # runs in a row that fitted at memory_limit: GROW_AFTER_RUNS of them double it
        self._loaded = False
        self._lock = threading.Lock()

    @property
    def version(self) -> str:
        """`stage:source@revision|k=v,...`: everything that decides this stage's output."""
        params = ",".join(
            f"{key}={value}" for key, value in sorted(self.params.items()) if key not in self.runtime_params
        )
        return f"{self.name}:{self.located.spec.source}@{self.located.revision}|impl={self.implementation},{params}"

    @property
    def input_side(self) -> int | None:
        """The longest image side this stage's model makes use of, read without loading it; None for a stage
        that looks at no pixels."""
        return None

    @property
    def configured_batch_size(self) -> int:
        return int(self.params.get("batch_size", self.default_batch_size))

    @property
    def batch_size(self) -> int:
        """Images per model call now: the configured size, or less since the GPU ran out of memory."""
        configured = self.configured_batch_size
        return min(configured, self.memory_limit or configured)

    def in_runs(self, items: list, run: Callable[[list], list]) -> list:
        """`run` over `items` in runs of at most `batch_size`, results concatenated in order.

        A run that exhausts GPU memory is halved and tried again, down to one item; the smaller size is kept
        for this stage, and doubled again (up to the configured size) after GROW_AFTER_RUNS runs in a row fitted
        at it: what ran out may have been a burst (large images, another process on the GPU), not the stage's
        steady need. Only this stage's run is redone: the stages before it keep their results.
        """
        results: list = []
        start = 0
        while start < len(items):
            part = items[start : start + self.batch_size]
            try:
                results.extend(run(part))
            except Exception as error:
                if not is_out_of_memory(error) or len(part) == 1:
                    raise
                free_gpu_memory()
                self.memory_limit, self._fitted_runs = len(part) // 2, 0
                continue
            start += len(part)
            self._fitted(len(part))
        return results

    def _fitted(self, size: int) -> None:
        """A run of `size` fitted: once enough runs in a row fitted at the halved size, try twice as many."""
        if self.memory_limit is None or size < self.memory_limit:
            return  # a short last run says nothing about the limit
        self._fitted_runs += 1
        if self._fitted_runs >= GROW_AFTER_RUNS:
            grown = self.memory_limit * 2
            self.memory_limit, self._fitted_runs = (grown if grown < self.configured_batch_size else None), 0

    @property
    def precision(self) -> str:
        return self.params.get("precision", "fp32")

    @property
    def loaded(self) -> bool:
        return self._loaded

    def load(self) -> None:
        """Loads the model on first use; later calls return at once."""
        with self._lock:
            if self._loaded:
                return
            started = time.perf_counter()
            try:
                self._load()
            except Exception as error:
                raise ModelLoadError(
                    f"Could not load the {self.name} model from {self.located.path}: {error}"
                ) from error
            self.load_seconds = time.perf_counter() - started
            self._loaded = True

    @abstractmethod
    def _load(self) -> None: ...
