"""Detection metrics: ACC at a threshold, and the ranking metrics (AP, PR and ROC curves) from scikit-learn.

Conventions throughout: label 0 = real, 1 = fake; a score is P(fake); an image is flagged fake when
`score >= threshold`. The ranking metrics are scikit-learn's own, so figures here compare with the papers that
used it. This module only adds what an evaluation report needs around them: inputs checked once with clear
errors, and NaN rather than a warning or an exception where a metric is undefined (no fakes for AP, one class
only for ROC), so one degenerate group does not abort or skew a whole report.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike


def _labels_and_scores(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    label_array = np.asarray(labels).ravel()
    score_array = np.asarray(scores, dtype=np.float64).ravel()
    if label_array.shape != score_array.shape:
        raise ValueError(f"labels and scores must have the same length; got {label_array.size} and {score_array.size}.")
    if not np.isin(label_array, (0, 1)).all():
        raise ValueError("labels must be 0 (real) or 1 (fake); other values were given.")
    if not np.isfinite(score_array).all():
        raise ValueError("scores must be finite numbers (P(fake)); NaN or infinity was given.")
    return label_array.astype(np.int64), score_array


def _real_scores(real_scores: ArrayLike) -> np.ndarray:
    array = np.asarray(real_scores, dtype=np.float64).ravel()
    if not np.isfinite(array).all():
        raise ValueError("scores must be finite numbers (P(fake)); NaN or infinity was given.")
    return array


def accuracy(labels: ArrayLike, scores: ArrayLike, threshold: float) -> float:
    """Fraction of images whose flag (score >= threshold) matches the label; NaN for no images.

    Labels and scores may be lists, numpy arrays or (CPU) tensors.
    """
    label_array, score_array = _labels_and_scores(labels, scores)
    if label_array.size == 0:
        return math.nan
    return float(np.mean((score_array >= threshold) == (label_array == 1)))


def _sklearn():
    """scikit-learn's metrics, imported when first needed: it is slow to import, and scoring one image needs none."""
    from sklearn import metrics

    return metrics


def precision_recall_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) as scikit-learn gives them: thresholds increasing, recall decreasing.

    precision and recall have one more entry than thresholds, the final (precision 1, recall 0) point where
    nothing is flagged. With no fakes, recall is undefined and is NaN throughout (scikit-learn reports 1);
    with no images all three arrays are empty.
    """
    label_array, score_array = _labels_and_scores(labels, scores)
    if label_array.size == 0:
        return np.empty(0), np.empty(0), np.empty(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "no positive class": answered with NaN below
        precision, recall, thresholds = _sklearn().precision_recall_curve(label_array, score_array)
    if not label_array.any():
        recall = np.r_[np.full(recall.size - 1, math.nan), 0.0]
    return precision, recall, thresholds


def average_precision(labels: ArrayLike, scores: ArrayLike) -> float:
    """scikit-learn's `average_precision_score` (step-wise, no interpolation); NaN when there are no fakes."""
    label_array, score_array = _labels_and_scores(labels, scores)
    if not label_array.any():
        return math.nan
    return float(_sklearn().average_precision_score(label_array, score_array))


def roc_curve(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds), thresholds decreasing from +inf (nothing flagged), one point per distinct score.

    Every point is kept (scikit-learn's `drop_intermediate=False`). The rate whose class is absent is NaN
    throughout: fpr with no real images, tpr with no fakes. With no images all three arrays are empty.
    """
    label_array, score_array = _labels_and_scores(labels, scores)
    if label_array.size == 0:
        return np.empty(0), np.empty(0), np.empty(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a class missing: that rate is NaN, as documented
        fpr, tpr, thresholds = _sklearn().roc_curve(label_array, score_array, drop_intermediate=False)
    if label_array.all():
        fpr = np.full(fpr.shape, math.nan)
    if not label_array.any():
        tpr = np.full(tpr.shape, math.nan)
    return fpr, tpr, np.r_[np.inf, thresholds[1:]]  # the "flag nothing" threshold, whatever the release calls it


def roc_auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """scikit-learn's `roc_auc_score`; NaN unless both classes are present."""
    label_array, score_array = _labels_and_scores(labels, scores)
    if label_array.all() or not label_array.any():
        return math.nan
    return float(_sklearn().roc_auc_score(label_array, score_array))


def false_positive_rate(real_scores: ArrayLike, threshold: float) -> float:
    """Fraction of known-real images flagged fake at this threshold; NaN for no images."""
    array = _real_scores(real_scores)
    return float(np.mean(array >= threshold)) if array.size else math.nan


def threshold_for_fpr(real_scores: ArrayLike, target_fpr: float) -> float:
    """A threshold whose false-positive rate on these known-real scores is at most target_fpr, flagging as many
    of them as that allows.

    With k = floor(target * n) false positives allowed and the scores sorted high to low, every threshold above
    the (k+1)-th score s and at most the next higher distinct score u flags the same images, and any threshold at
    or below s flags at least k+1. The midpoint of (s, u] is returned rather than the float just above s: a
    margin on both sides, so the last-flagged and first-passed images do not swap over a rounding difference
    between machines. Ties with s are never flagged, so ties cannot push the rate over the target.
    """
    if not (isinstance(target_fpr, numbers.Real) and 0 <= target_fpr < 1):
        raise ValueError(f"target_fpr must be a number with 0 <= target_fpr < 1; got {target_fpr!r}.")
    array = _real_scores(real_scores)
    if array.size == 0:
        raise ValueError("threshold_for_fpr needs at least one real score; none were given.")
    allowed = math.floor(target_fpr * array.size + 1e-9)  # the epsilon keeps 0.29 * 100 (28.999...) from flooring to 28
    if allowed >= array.size:
        return float(array.min())
    boundary = np.sort(array)[::-1][allowed]
    higher = array[array > boundary]
    if higher.size == 0:
        return float(np.nextafter(boundary, np.inf))
    return float((boundary + higher.min()) / 2)


def fpr_upper_bound(false_positives: int, n: int, confidence: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on the true false-positive rate after seeing false_positives of n.

    With 0 of n observed this is 1 - (1 - confidence)^(1/n), about 3/n at 95% (the "rule of three").
    """
    if not (isinstance(n, numbers.Integral) and n > 0):
        raise ValueError(f"n must be a positive integer; got {n!r}.")
    if not (isinstance(false_positives, numbers.Integral) and 0 <= false_positives <= n):
        raise ValueError(f"false_positives must be an integer from 0 to n={n}; got {false_positives!r}.")
    if not (isinstance(confidence, numbers.Real) and 0 < confidence < 1):
        raise ValueError(f"confidence must be strictly between 0 and 1; got {confidence!r}.")
    if false_positives == n:
        return 1.0
    from scipy.stats import beta  # scipy.stats takes about a second to import; only this function needs it

    return float(beta.ppf(confidence, false_positives + 1, n - false_positives))


@dataclass(frozen=True)
class GroupMetrics:
    group: str
    n: int
    n_real: int
    n_fake: int
    accuracy: float
    average_precision: float
    real_accuracy: float  # fraction of real images kept (1 - FPR); NaN with none
    fake_accuracy: float  # fraction of fakes flagged (recall); NaN with none

    def to_dict(self) -> dict[str, str | int | float]:
        return asdict(self)


def _group_row(group: str, labels: np.ndarray, scores: np.ndarray, threshold: float) -> GroupMetrics:
    is_fake = labels == 1
    return GroupMetrics(
        group=group,
        n=int(labels.size),
        n_real=int((~is_fake).sum()),
        n_fake=int(is_fake.sum()),
        accuracy=accuracy(labels, scores, threshold),
        average_precision=average_precision(labels, scores),
        real_accuracy=accuracy(labels[~is_fake], scores[~is_fake], threshold),
        fake_accuracy=accuracy(labels[is_fake], scores[is_fake], threshold),
    )


def group_metrics(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike, threshold: float) -> list[GroupMetrics]:
    """One row per group (e.g. per generator), in the order each group first appears."""
    label_array, score_array = _labels_and_scores(labels, scores)
    group_array = np.asarray(groups).ravel()
    if group_array.shape != label_array.shape:
        raise ValueError(f"groups must have one entry per label; got {group_array.size} for {label_array.size} labels.")
    names = list(dict.fromkeys(group_array.tolist()))
    rows = []
    for name in names:
        member = group_array == name
        rows.append(_group_row(str(name), label_array[member], score_array[member], threshold))
    return rows


def _nanmean(values: list[float]) -> float:
    finite = [value for value in values if not math.isnan(value)]
    return sum(finite) / len(finite) if finite else math.nan


def mean_row(rows: list[GroupMetrics], name: str = "mean") -> GroupMetrics:
    """The unweighted mean over groups, as in the paper's "mean" column: it averages generators, not images,
    so a generator with few test images counts as much as one with many. NaN entries (e.g. AP of a group
    without fakes) are left out of the mean; counts are summed.
    """
    return GroupMetrics(
        group=name,
        n=sum(row.n for row in rows),
        n_real=sum(row.n_real for row in rows),
        n_fake=sum(row.n_fake for row in rows),
        accuracy=_nanmean([row.accuracy for row in rows]),
        average_precision=_nanmean([row.average_precision for row in rows]),
        real_accuracy=_nanmean([row.real_accuracy for row in rows]),
        fake_accuracy=_nanmean([row.fake_accuracy for row in rows]),
    )
