"""Scanning files in-process: paths → batches → detections, one row per file, errors included.

A bad file never stops a scan: it becomes a row whose `error` holds the stable code and message.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.defaults import DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from pipeline.core.detector import Detector
from pipeline.core.errors import ItemError
from pipeline.core.files import read_image_file
from pipeline.core.imaging import DecodedImage, decode_image
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
            row.update({key: None for key in ("sha256", "p_fake", "verdict", "caption", "pipeline_version")})
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
) -> Iterator[ScanRow]:
    """Yields one row per file, in order, batching the decodable ones through the detector."""
    for start in range(0, len(files), batch_size):
        batch = files[start : start + batch_size]
        rows, decoded, decode_ms = [], [], []
        for path in batch:
            started = time.perf_counter()
            row = ScanRow(path)
            try:
                image = decode_image(read_image_file(path, max_bytes), max_pixels=max_pixels, max_bytes=max_bytes)
                decoded.append((row, image))
            except ItemError as error:
                row.error = error
            decode_ms.append((row, (time.perf_counter() - started) * 1000))
            rows.append(row)
        _detect(detector, decoded)
        for row, ms in decode_ms:
            if row.detection is not None:
                row.detection.timings_ms = {"decode": ms, **row.detection.timings_ms}
        yield from rows


def _detect(detector: Detector, decoded: list[tuple[ScanRow, DecodedImage]]) -> None:
    if not decoded:
        return
    detections = detector.detect([image for _, image in decoded])
    for (row, _), detection in zip(decoded, detections, strict=True):
        row.detection = detection
