"""Unit tests for pipeline.lab.detection_metrics: scikit-learn is the independent reference for the ranking metrics.

Random cases cover ties (scores rounded to one decimal), imbalanced classes and tiny sets; the FPR threshold
and the Clopper-Pearson bound are checked against their definitions rather than against fixed numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import binom
from sklearn import metrics as sk

from pipeline.lab.detection_metrics import (
    GroupMetrics,
    accuracy,
    average_precision,
    false_positive_rate,
    fpr_upper_bound,
    group_metrics,
    mean_row,
    precision_recall_curve,
    roc_auc,
    roc_curve,
    threshold_for_fpr,
)

FAKE_SHARES = (0.05, 0.3, 0.5, 0.9)


def random_case(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels with both classes and scores that mildly separate them; every third case has heavy ties."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 80))
    labels = (rng.random(n) < FAKE_SHARES[seed % len(FAKE_SHARES)]).astype(int)
    labels[rng.choice(n, size=2, replace=False)] = [0, 1]  # both classes, always
    scores = np.clip(rng.normal(0.4 + 0.2 * labels, 0.25), 0, 1)
    if seed % 3 == 0:
        scores = np.round(scores, 1)
    return labels, scores


CASES = range(120)


@pytest.mark.parametrize("seed", CASES)
def test_ranking_metrics_match_scikit_learn(seed):
    labels, scores = random_case(seed)
    assert average_precision(labels, scores) == pytest.approx(sk.average_precision_score(labels, scores))
    assert roc_auc(labels, scores) == pytest.approx(sk.roc_auc_score(labels, scores))


@pytest.mark.parametrize("seed", CASES)
def test_curves_match_scikit_learn(seed):
    labels, scores = random_case(seed)
    precision, recall, thresholds = precision_recall_curve(labels, scores)
    expected = sk.precision_recall_curve(labels, scores)
    for ours, theirs in zip((precision, recall, thresholds), expected, strict=True):
        assert ours == pytest.approx(theirs)

    fpr, tpr, roc_thresholds = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thresholds = sk.roc_curve(labels, scores, drop_intermediate=False)
    assert fpr == pytest.approx(sk_fpr)
    assert tpr == pytest.approx(sk_tpr)
    # The first threshold means "flag nothing"; its value has changed between scikit-learn releases.
    assert roc_thresholds[1:] == pytest.approx(sk_thresholds[1:])


@pytest.mark.parametrize("seed", range(30))
def test_accuracy_matches_scikit_learn(seed):
    labels, scores = random_case(seed)
    for threshold in (0.0, 0.3, 0.5, float(np.median(scores)), 1.0):
        predicted = (scores >= threshold).astype(int)
        assert accuracy(labels, scores, threshold) == pytest.approx(sk.accuracy_score(labels, predicted))


def test_accuracy_counts_a_score_at_the_threshold_as_fake():
    assert accuracy([1, 0], [0.5, 0.49], 0.5) == 1.0


def test_array_likes_are_accepted():
    assert average_precision([0, 1, 1], (0.1, 0.8, 0.3)) == pytest.approx(
        average_precision(np.array([0, 1, 1]), [0.1, 0.8, 0.3])
    )


def test_undefined_metrics_are_nan():
    assert math.isnan(accuracy([], [], 0.5))
    assert math.isnan(average_precision([0, 0], [0.2, 0.7]))
    assert math.isnan(roc_auc([1, 1], [0.2, 0.7]))
    assert math.isnan(roc_auc([0, 0], [0.2, 0.7]))
    assert math.isnan(false_positive_rate([], 0.5))
    _, recall, _ = precision_recall_curve([0, 0], [0.2, 0.7])
    assert np.isnan(recall[:-1]).all()
    fpr, tpr, _ = roc_curve([1, 1], [0.2, 0.7])
    assert np.isnan(fpr).all() and not np.isnan(tpr).any()


def test_average_precision_of_only_fakes_is_one():
    assert average_precision([1, 1, 1], [0.2, 0.7, 0.7]) == 1.0


@pytest.mark.parametrize(
    ("labels", "scores"),
    [([0, 1, 2], [0.1, 0.2, 0.3]), ([0, 1], [0.1]), ([0, 1], [0.1, float("nan")])],
)
def test_bad_inputs_are_refused(labels, scores):
    with pytest.raises(ValueError):
        average_precision(labels, scores)


# --- thresholds at a target false-positive rate ---------------------------------------------------------------


def real_score_sets() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [
        rng.random(500),
        np.round(rng.random(300), 1),  # heavy ties
        rng.integers(0, 3, size=200) / 2.0,  # three distinct values only
        np.full(50, 0.4),  # one value
        rng.random(7),
        np.arange(300) / 300.0,
    ]


@pytest.mark.parametrize("target", [0.0, 0.001, 0.01, 0.05, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("set_index", range(len(real_score_sets())))
def test_threshold_for_fpr_flags_as_many_as_the_target_allows(target, set_index):
    real_scores = real_score_sets()[set_index]
    threshold = threshold_for_fpr(real_scores, target)
    assert isinstance(threshold, float)
    assert false_positive_rate(real_scores, threshold) <= target
    lower_scores = real_scores[real_scores < threshold]
    if lower_scores.size:  # the next lower candidate threshold must flag too many
        assert false_positive_rate(real_scores, lower_scores.max()) > target


def test_threshold_for_fpr_leaves_a_margin_on_both_sides():
    real_scores = np.array([0.1, 0.2, 0.3, 0.5, 0.9])
    assert threshold_for_fpr(real_scores, 0.2) == pytest.approx(0.7)  # halfway between 0.5 (passed) and 0.9 (flagged)
    assert threshold_for_fpr(real_scores, 0.0) == np.nextafter(0.9, 1)  # nothing above the highest to split from


def test_threshold_for_fpr_allows_exactly_floor_target_times_n():
    real_scores = np.arange(100) / 100.0
    threshold = threshold_for_fpr(real_scores, 0.29)  # 0.29 * 100 is 28.999999999999996 in floating point
    assert int((real_scores >= threshold).sum()) == 29


@pytest.mark.parametrize(("scores", "target"), [([], 0.1), ([0.5], -0.1), ([0.5], 1.0), ([0.5], float("nan"))])
def test_threshold_for_fpr_refuses_bad_input(scores, target):
    with pytest.raises(ValueError):
        threshold_for_fpr(scores, target)


def test_fpr_upper_bound_known_case_rule_of_three():
    bound = fpr_upper_bound(0, 300, 0.95)
    assert bound == pytest.approx(1 - 0.05 ** (1 / 300))
    assert bound == pytest.approx(3 / 300, rel=0.01)


@pytest.mark.parametrize(("false_positives", "n"), [(0, 10), (1, 10), (3, 300), (17, 1000), (9, 10)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_fpr_upper_bound_is_the_clopper_pearson_bound(false_positives, n, confidence):
    bound = fpr_upper_bound(false_positives, n, confidence)
    assert false_positives / n <= bound <= 1
    # At the bound, seeing this few false positives or fewer has probability exactly 1 - confidence.
    assert binom.cdf(false_positives, n, bound) == pytest.approx(1 - confidence)


def test_fpr_upper_bound_edges():
    assert fpr_upper_bound(5, 5) == 1.0
    for bad in [(-1, 10), (11, 10), (0, 0), (1.5, 10)]:
        with pytest.raises(ValueError):
            fpr_upper_bound(*bad)
    with pytest.raises(ValueError):
        fpr_upper_bound(0, 10, confidence=1.0)


# --- per-group rows -------------------------------------------------------------------------------------------


def test_group_metrics_counts_and_order():
    labels = [0, 1, 1, 0, 1]
    scores = [0.2, 0.9, 0.4, 0.85, 0.8]
    groups = ["b", "a", "b", "a", "a"]
    b_row, a_row = group_metrics(labels, scores, groups, threshold=0.5)

    assert (b_row.group, b_row.n, b_row.n_real, b_row.n_fake) == ("b", 2, 1, 1)
    assert (b_row.accuracy, b_row.real_accuracy, b_row.fake_accuracy) == (0.5, 1.0, 0.0)
    assert b_row.average_precision == 1.0  # the fake outranks the real image

    assert (a_row.group, a_row.n, a_row.n_real, a_row.n_fake) == ("a", 3, 1, 2)
    assert a_row.accuracy == pytest.approx(2 / 3)
    assert (a_row.real_accuracy, a_row.fake_accuracy) == (0.0, 1.0)
    assert a_row.average_precision == pytest.approx(sk.average_precision_score([1, 0, 1], [0.9, 0.85, 0.8]))
    assert a_row.to_dict()["n_fake"] == 2


def test_group_without_fakes_has_nan_ap_and_fake_accuracy():
    (row,) = group_metrics([0, 0], [0.1, 0.7], ["real"] * 2, threshold=0.5)
    assert math.isnan(row.average_precision) and math.isnan(row.fake_accuracy)
    assert row.real_accuracy == 0.5


def row(name: str, n_fake: int, acc: float, ap: float) -> GroupMetrics:
    return GroupMetrics(
        name,
        n=n_fake + 10,
        n_real=10,
        n_fake=n_fake,
        accuracy=acc,
        average_precision=ap,
        real_accuracy=acc,
        fake_accuracy=math.nan,
    )


def test_mean_row_is_the_unweighted_mean_over_groups():
    rows = [row("big", 1000, 0.9, 0.95), row("small", 10, 0.5, math.nan), row("mid", 100, 0.7, 0.75)]
    mean = mean_row(rows)
    assert mean.group == "mean"
    assert (mean.n, mean.n_real, mean.n_fake) == (1140, 30, 1110)
    assert mean.accuracy == pytest.approx((0.9 + 0.5 + 0.7) / 3)  # not weighted by the 1000 images of "big"
    assert mean.average_precision == pytest.approx((0.95 + 0.75) / 2)  # NaN left out
    assert math.isnan(mean.fake_accuracy)  # all NaN stays NaN
    assert mean_row(rows, name="avg").group == "avg"
