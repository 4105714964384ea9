"""Calibration's two thresholds: the false-positive target on reals, the catch target on fakes, the band between."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.head import Head, HeadMetadata
from pipeline.core.results import verdict
from pipeline.lab.calibration import calibrate

VERSIONS = {"caption": "caption:a@1", "ground": "ground:b@1", "embed": "embed:c@1"}


def _head(**overrides) -> Head:
    return Head.create(HeadMetadata("tiny", VERSIONS, input_dim=4, hidden=2, **overrides))


def test_three_verdicts_and_one_threshold_as_before():
    assert [verdict(p, 0.8, 0.3) for p in (0.1, 0.3, 0.5, 0.8, 0.95)] == ["real", *["uncertain"] * 2, "fake", "fake"]
    assert [verdict(p, 0.5) for p in (0.49, 0.5)] == ["real", "fake"]  # no band: exactly the old rule
    assert _head(threshold_low=0.3).verdict(0.4) == "uncertain" and _head().verdict(0.4) == "real"


def test_the_band_enters_the_version_only_when_there_is_one():
    assert _head().version != _head(threshold_low=0.3).version
    assert _head().version == _head(threshold_low=None).version


def test_calibration_sets_both_edges_from_their_targets():
    # given reals spread low and fakes spread high, overlapping in the middle
    reals = np.linspace(0.0, 0.6, 100)
    fakes = np.linspace(0.3, 1.0, 100)
    head, report = calibrate(_head(), reals, 0.05, fakes, 0.95)
    # then at most 5% of reals are fake, at least 95% of fakes are not real, and the shares add up
    assert report.fpr <= 0.05 and np.mean(reals >= report.threshold) == report.fpr
    assert report.threshold_low < report.threshold and report.fakes_caught >= 0.95
    assert report.fakes_caught == pytest.approx(np.mean(fakes >= report.threshold_low))
    assert report.real_in_band == pytest.approx(np.mean((reals >= report.threshold_low) & (reals < report.threshold)))
    assert report.fake_in_band == pytest.approx(report.fakes_caught - report.fakes_flagged)
    assert head.metadata.threshold_low == report.threshold_low and head.metadata.threshold == report.threshold


def test_no_band_when_the_threshold_already_catches_enough():
    reals, fakes = np.linspace(0.0, 0.4, 100), np.linspace(0.6, 1.0, 100)  # separable
    head, report = calibrate(_head(threshold_low=0.2), reals, 0.01, fakes, 0.9)
    assert report.threshold_low is None and head.metadata.threshold_low is None
    assert any("no uncertain band" in warning for warning in report.warnings)


def test_calibrating_the_false_positives_alone_keeps_a_band_that_still_fits():
    reals = np.linspace(0.0, 0.6, 100)
    kept, _ = calibrate(_head(threshold_low=0.2), reals, 0.05)
    assert kept.metadata.threshold_low == 0.2
    dropped, _ = calibrate(_head(threshold_low=0.9), reals, 0.05)  # now above the threshold: no band
    assert dropped.metadata.threshold_low is None
