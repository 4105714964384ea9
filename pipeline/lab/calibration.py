"""Calibration: the threshold that flags a chosen share of real photos, measured on known-real images.

"How many real photos will this flag?" is the question platforms ask first. Given P(fake) for a set of
images known to be real, the threshold is set so that at most `target_fpr` of them would be flagged, and the
head is saved with it (a new threshold is a new head version). The report also gives a 95 % upper bound on the
true rate, because a few hundred images cannot promise a rate of one in a thousand.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from pipeline.core.files import collect_files
from pipeline.core.head import Head
from pipeline.lab import detection_metrics
from pipeline.lab.datasets import DatasetError, Sample, load_dataset


@dataclass(frozen=True)
class CalibrationReport:
    target_fpr: float
    threshold: float
    previous_threshold: float
    n_real: int
    false_positives: int
    fpr: float  # on the calibration set, at the new threshold
    fpr_upper_95: float  # one-sided Clopper-Pearson bound on the true rate
    warnings: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "warnings": list(self.warnings)}


def calibrate(head: Head, real_scores: np.ndarray, target_fpr: float) -> tuple[Head, CalibrationReport]:
    """A copy of `head` whose threshold keeps the false-positive rate on `real_scores` at or under the target."""
    scores = np.asarray(real_scores, dtype=np.float64)
    threshold = detection_metrics.threshold_for_fpr(scores, target_fpr)
    flagged = int((scores >= threshold).sum())
    report = CalibrationReport(
        target_fpr=target_fpr,
        threshold=threshold,
        previous_threshold=head.metadata.threshold,
        n_real=len(scores),
        false_positives=flagged,
        fpr=flagged / len(scores),
        fpr_upper_95=detection_metrics.fpr_upper_bound(flagged, len(scores)),
        warnings=tuple(_warnings(scores, threshold, target_fpr)),
    )
    training = {**head.metadata.training, "calibration": report.to_dict()}
    return Head(head.module, replace(head.metadata, threshold=threshold, training=training)), report


def _warnings(scores: np.ndarray, threshold: float, target_fpr: float) -> list[str]:
    warnings = []
    if target_fpr > 0 and len(scores) < math.ceil(3 / target_fpr):
        warnings.append(
            f"{len(scores)} real images are too few to support a rate of {target_fpr:g}: with none flagged the "
            f"95% bound is still about 3/{len(scores)}; use at least {math.ceil(3 / target_fpr)}."
        )
    if threshold > 1.0:
        warnings.append(
            "The threshold is above 1: the head gives some real images P(fake) = 1.0, so meeting the target "
            "flags nothing at all. The head is overconfident on this data; retrain or use more varied training data."
        )
    return warnings


def real_samples(path: Path | str) -> list[Sample]:
    """Known-real images: the real half of a dataset in any recognised layout, or every file of a plain folder."""
    path = Path(path)
    try:
        samples = [sample for sample in load_dataset(path).samples if sample.label == 0]
    except DatasetError as error:
        if error.code != "dataset.unrecognised":
            raise
        samples = [Sample(file, 0, path.name) for file in collect_files([path])]
    if not samples:
        raise DatasetError(f"No real images under {path}.", code="dataset.empty")
    return samples
