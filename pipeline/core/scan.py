"""Scanning files in-process: paths → batches → detections, one row per file, errors included.

A bad file never stops a scan: it becomes a row whose `error` holds the stable code and message.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

from pipeline.core.batches import Input, Reader, batched, once_per_image
from pipeline.core.defaults import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from pipeline.core.detector import Detector
from pipeline.core.errors import ItemError
from pipeline.core.files import read_image_file
from pipeline.core.provenance import ProvenanceReader
from pipeline.core.results import Detection


@dataclass
class ScanRow:
    path: Path
    detection: Detection | None = None
    error: ItemError | None = None

    def to_dict(self) -> dict:
        row = {"path": str(self.path)}
        if self.detection is not None:
            row.update(self.detection.to_dict())
        else:
            empty = ("sha256", "p_fake", "verdict", "caption", "attribution", "provenance", "pipeline_version")
            row.update({key: None for key in empty})
            row["objects"] = []
        row["error"] = self.error.to_dict() if self.error else None
        return row


def scan(
    files: list[Path],
    detector: Detector,
    *,
    batch_size: int = 8,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    provenance: ProvenanceReader | None = None,
) -> Iterator[ScanRow]:
    """Yields one row per file, in order, batching the decodable ones through the detector; with `provenance`,
    each row says what its file's bytes declare."""
    reader = Reader(max_pixels=max_pixels, max_bytes=max_bytes, provenance=provenance)
    for batch in batched(files, batch_size):
        inputs = reader.load(batch, lambda path: read_image_file(path, max_bytes))
        detections = once_per_image(detector.detect, {one.sha256: one.image for one in inputs if one.ok}, {})
        yield from (_row(one, detections) for one in inputs)


def _row(one: Input[Path], detections: dict[str, Detection]) -> ScanRow:
    if not one.ok:
        return ScanRow(one.item, error=one.error)
    detection = detections[one.sha256]  # shared by files with the same bytes: each row gets its own timings
    return ScanRow(one.item, replace(detection, timings_ms={"decode": one.ms, **detection.timings_ms}))
