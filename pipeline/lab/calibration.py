"""Calibration: the threshold that flags a chosen share of real photos, measured on known-real images, and
optionally the uncertain band below it, from a share of known-fake images that must not pass as real.

With both, a head has three verdicts: `fake` at or above the threshold (at most `target_fpr` of real images),
`real` below `threshold_low` (at most 1 - `target_catch` of fakes), `uncertain` between: an honest "unsure"
where the head cannot meet both targets with one number. The report says how many images land in the band.

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
    threshold_low: float | None = None  # real below it; None: no uncertain band
    target_catch: float | None = None  # share of known fakes that must score at or above threshold_low
    n_fake: int = 0
    fakes_caught: float | None = None  # share of the known fakes not called real (fake or uncertain)
    fakes_flagged: float | None = None  # share of the known fakes called fake
    real_in_band: float | None = None  # share of the known reals called uncertain
    fake_in_band: float | None = None  # share of the known fakes called uncertain

    def to_dict(self) -> dict:
        return {**asdict(self), "warnings": list(self.warnings)}


def calibrate(
    head: Head,
    real_scores: np.ndarray,
    target_fpr: float,
    fake_scores: np.ndarray | None = None,
    target_catch: float | None = None,
) -> tuple[Head, CalibrationReport]:
    """A copy of `head` whose threshold keeps the false-positive rate on `real_scores` at or under the target;
    with `fake_scores` and `target_catch`, also the lower edge of an uncertain band under which at most
    1 - `target_catch` of the fakes fall. Without them, an existing band is kept while it stays below the new
    threshold."""
    scores = np.asarray(real_scores, dtype=np.float64)
    threshold = detection_metrics.threshold_for_fpr(scores, target_fpr)
    flagged = int((scores >= threshold).sum())
    warnings = _warnings(scores, threshold, target_fpr)
    low = head.metadata.threshold_low
    band: dict = {}
    if fake_scores is not None and target_catch is not None:
        fakes = np.asarray(fake_scores, dtype=np.float64)
        low = _low_threshold(fakes, target_catch)
        band = {"target_catch": target_catch, "n_fake": len(fakes)}
    if low is not None and low >= threshold:
        if band:
            warnings.append(
                f"The threshold for {target_fpr:.2%} false positives already catches {target_catch:.0%} of the "
                "fakes: no uncertain band is needed, and the head keeps one threshold."
            )
        low = None
    band |= _band_shares(scores, fake_scores, threshold, low)
    report = CalibrationReport(
        target_fpr=target_fpr,
        threshold=threshold,
        previous_threshold=head.metadata.threshold,
        n_real=len(scores),
        false_positives=flagged,
        fpr=flagged / len(scores),
        fpr_upper_95=detection_metrics.fpr_upper_bound(flagged, len(scores)),
        warnings=tuple(warnings),
        threshold_low=low,
        **band,
    )
    training = {**head.metadata.training, "calibration": report.to_dict()}
    metadata = replace(head.metadata, threshold=threshold, threshold_low=low, training=training)
    return Head(head.module, metadata), report


def _low_threshold(fake_scores: np.ndarray, target_catch: float) -> float:
    """The highest edge that still leaves at least `target_catch` of the fakes at or above it: the score of the
    k-th highest-scoring fake, k = ceil(target_catch × n)."""
    if not len(fake_scores):
        raise ValueError("No known-fake image could be scored: the uncertain band needs some.")
    if not 0 < target_catch <= 1:
        raise ValueError(f"target_catch must be in (0, 1]; got {target_catch}.")
    ranked = np.sort(fake_scores)[::-1]
    return float(ranked[max(1, math.ceil(target_catch * len(ranked))) - 1])


def _band_shares(reals: np.ndarray, fakes: np.ndarray | None, high: float, low: float | None) -> dict:
    """How the known images fall: reals and fakes in the band, fakes caught (not called real) and flagged."""

    def share(values, condition):
        return float(condition(values).mean()) if values is not None and len(values) else None

    if low is None:
        shares = {"real_in_band": 0.0, "fake_in_band": 0.0 if fakes is not None else None}
        caught = share(fakes, lambda v: v >= high)
        return shares | {"fakes_caught": caught, "fakes_flagged": caught}
    return {
        "real_in_band": share(reals, lambda v: (v >= low) & (v < high)),
        "fake_in_band": share(fakes, lambda v: (v >= low) & (v < high)),
        "fakes_caught": share(fakes, lambda v: v >= low),
        "fakes_flagged": share(fakes, lambda v: v >= high),
    }


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
    return labelled_samples(path, 0)


def labelled_samples(path: Path | str, label: int) -> list[Sample]:
    """Images known to be of `label` (0 real, 1 fake): that half of a dataset, or every file of a plain folder."""
    path = Path(path)
    try:
        samples = [sample for sample in load_dataset(path).samples if sample.label == label]
    except DatasetError as error:
        if error.code != "dataset.unrecognised":
            raise
        samples = [Sample(file, label, path.name) for file in collect_files([path])]
    if not samples:
        raise DatasetError(f"No {('real', 'fake')[label]} images under {path}.", code="dataset.empty")
    return samples
