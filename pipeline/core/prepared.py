"""A batch's host work, done before its models run: what `Detector.prepare` hands to `Detector.detect`.

Preparing is everything a stage does on the CPU before its model can start: the head's input transform, the
one downscale, each stage's image processor at its real input size (BLIP's square, Grounding DINO's canvas),
CLIP's pixel copy. A worker prepares batch k+1 on its prefetch thread while the device runs batch k (most of this
work is in Pillow and torch, which release the GIL), so the model thread only starts models and copies tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.core.imaging import StageImage


@dataclass
class StageInputs:
    """One stage's prepared inputs: `rows[r]` is the batch position of row r of `data` (rows in batch order)."""

    rows: list[int]
    data: Any  # a tensor with a row per image, a dict of them, or a list of per-image tensors

    def part(self, start: int, end: int) -> StageInputs:
        """The rows of batch positions start..end-1, renumbered from 0 (a slice: views, not copies)."""
        first = next((r for r, position in enumerate(self.rows) if position >= start), len(self.rows))
        last = next((r for r, position in enumerate(self.rows) if position >= end), len(self.rows))
        rows = [position - start for position in self.rows[first:last]]
        if isinstance(self.data, dict):
            return StageInputs(rows, {key: value[first:last] for key, value in self.data.items()})
        return StageInputs(rows, self.data[first:last])

    def of(self, todo: list[int]) -> Any:
        """The data, if it was prepared for exactly the images `todo`; else None (the stage prepares them)."""
        return self.data if self.rows == todo else None


@dataclass
class Prepared:
    """Each image downscaled for the stages (None where no stage needs it), and each stage's inputs."""

    staged: list[StageImage | None]
    inputs: dict[str, StageInputs] = field(default_factory=dict)  # by stage name
    ms_per_image: float = 0.0  # the host time it took, shared equally among the images prepared

    def part(self, start: int, end: int) -> Prepared:
        """The same for images start..end-1 of the batch (a batch halved after the GPU ran out of memory)."""
        inputs = {stage: value.part(start, end) for stage, value in self.inputs.items()}
        return Prepared(self.staged[start:end], inputs, self.ms_per_image)

    def of(self, stage: str, todo: list[int]) -> Any:
        inputs = self.inputs.get(stage)
        return inputs.of(todo) if inputs is not None else None
