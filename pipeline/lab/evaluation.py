"""Evaluating a head on cached features: the paper's tables (ACC and AP per generator, and their mean),
per-image scores, and the robustness grid of Fig. 4.

Accuracy is taken at the head's own threshold (0.5 unless calibrated), so the table says what the deployed
head would do; AP is threshold-free. The "mean" row averages generators, as the paper's tables do.

An attribution head also gets a confusion matrix: which class (real or a generator) it names for the images of
each true class. Fakes of a generator it was not trained on have no column of their own; they share a row
"other", which shows where unseen generators end up.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.core import results
from pipeline.core.detector import Detector
from pipeline.core.head import Head
from pipeline.core.transforms import IDENTITY, PAPER_PERTURBATIONS, Chain, perturbation
from pipeline.lab import detection_metrics
from pipeline.lab.datasets import Sample
from pipeline.lab.detection_metrics import GroupMetrics
from pipeline.lab.features import ArtifactCache, FeatureSet, effective_transform, extract
from pipeline.lab.training import UNSEEN, class_indices


def score(features: FeatureSet, head: Head) -> np.ndarray:
    """P(fake) for every image of the set, with the head's own w1/w2."""
    representation = features.representation(head.metadata.w1, head.metadata.w2)
    return head.predict(representation).numpy().astype(np.float64)


OTHER = "other"  # the confusion row of fakes from generators the head has no output for


@dataclass(frozen=True)
class Confusion:
    """Counts of (true class, predicted class): rows `labels`, columns the head's `groups`."""

    labels: list[str]  # the head's groups, then OTHER if any fake is unseen: row i < len(groups) is column i
    groups: list[str]
    matrix: np.ndarray  # (len(labels), len(groups)) counts

    @property
    def totals(self) -> np.ndarray:
        return self.matrix.sum(axis=1)

    def recall(self, row: int) -> float:
        """The share of a row's images given their own class; NaN for OTHER, which has no column, and for a class
        with no images."""
        if row >= len(self.groups) or not self.totals[row]:
            return math.nan
        return float(self.matrix[row, row] / self.totals[row])

    @property
    def accuracy(self) -> float:
        """The share of images of a known class (real, or a generator the head was trained on) given their own
        class; OTHER is left out, since no answer could be right for it. NaN when no such image is given."""
        known = self.matrix[: len(self.groups)]  # the rows in the order of the columns: right answers on the diagonal
        total = int(known.sum())
        return float(np.trace(known)) / total if total else math.nan

    def to_dict(self) -> dict:
        return {
            "accuracy": self.accuracy,
            "groups": list(self.groups),
            "matrix": self.matrix.tolist(),
            "labels": list(self.labels),
        }


def confusion(true: Sequence[str], predicted: Sequence[str], groups: Sequence[str]) -> Confusion:
    """Counts each (true, predicted) pair; a true class outside `groups` is counted in the row OTHER."""
    groups = list(groups)
    rows = [label if label in groups else OTHER for label in true]
    labels = groups + ([OTHER] if OTHER in rows else [])
    matrix = np.zeros((len(labels), len(groups)), dtype=np.int64)
    for row, column in zip(rows, predicted, strict=True):
        matrix[labels.index(row), groups.index(column)] += 1
    return Confusion(labels, groups, matrix)


def attribution(features: FeatureSet, head: Head) -> Confusion:
    """The attribution head's confusion on a set: true class "real" for every real image and the generator
    folder for a fake; predicted class the likeliest of the head's groups."""
    groups = head.metadata.groups
    representation = features.representation(head.metadata.w1, head.metadata.w2)
    predicted = [groups[index] for index in head.attribute(representation).argmax(dim=-1).tolist()]
    classes = class_indices(features.samples, groups).tolist()
    return confusion([groups[index] if index != UNSEEN else OTHER for index in classes], predicted, groups)


@dataclass
class EvalReport:
    groups: list[GroupMetrics]
    mean: GroupMetrics  # unweighted over groups, the paper's "mean" column
    overall: GroupMetrics  # every image pooled
    threshold: float
    features: FeatureSet
    scores: np.ndarray
    threshold_low: float | None = None  # the head's uncertain band, if it has one: verdicts in scores.csv
    attribution: Confusion | None = None  # attribution heads only

    @property
    def labels(self) -> np.ndarray:
        return self.features.labels.numpy()

    def rows(self) -> list[GroupMetrics]:
        return [*self.groups, self.mean, self.overall]


def evaluate(features: FeatureSet, head: Head) -> EvalReport:
    scores = score(features, head)
    labels, threshold = features.labels.numpy(), head.metadata.threshold
    groups = detection_metrics.group_metrics(labels, scores, features.groups, threshold)
    overall = detection_metrics.group_metrics(labels, scores, ["all"] * len(labels), threshold)
    empty = GroupMetrics("all", 0, 0, 0, *[math.nan] * 4)
    return EvalReport(
        groups=groups,
        mean=detection_metrics.mean_row(groups),
        overall=overall[0] if overall else empty,
        threshold=threshold,
        features=features,
        scores=scores,
        threshold_low=head.metadata.threshold_low,
        attribution=attribution(features, head) if head.attributes else None,
    )


# ------------------------------------------------------------------------------------------------ tables


def metrics_csv(rows: Sequence[GroupMetrics]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0].to_dict()) if rows else ["group"], lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: _csv_value(value) for key, value in row.to_dict().items()})
    return buffer.getvalue()


def scores_csv(report: EvalReport) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "group", "label", "p_fake", "verdict", "sha256", "format", "n_objects"])
    features = report.features
    for index, sample in enumerate(features.samples):
        p_fake = float(report.scores[index])
        verdict = results.verdict(p_fake, report.threshold, report.threshold_low)
        row = [sample.path, sample.group, sample.label, f"{p_fake:.6f}", verdict, features.sha256s[index]]
        writer.writerow([*row, features.formats[index], int(features.n_objects[index])])
    return buffer.getvalue()


def paper_table(report: EvalReport, method: str = "ITEM (this head)") -> str:
    """Markdown shaped like the paper's Tables I-III: one column per generator plus the mean, ACC / AP in %."""
    columns = [*report.groups, report.mean]
    header = "| Method | " + " | ".join(f"{row.group} ACC | {row.group} AP" for row in columns) + " |"
    rule = "|---|" + "---:|---:|" * len(columns)
    cells = " | ".join(f"{percent(row.accuracy)} | {percent(row.average_precision)}" for row in columns)
    return "\n".join([header, rule, f"| {method} | {cells} |"]) + "\n"


def long_table(rows: Sequence[GroupMetrics]) -> str:
    """Markdown with one row per group: easier to read than the paper's shape when there are many groups."""
    lines = [
        "| group | images | real | fake | ACC % | AP % | real ACC % | fake ACC % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        figures = (row.accuracy, row.average_precision, row.real_accuracy, row.fake_accuracy)
        lines.append(
            f"| {row.group} | {row.n} | {row.n_real} | {row.n_fake} | " + " | ".join(map(percent, figures)) + " |"
        )
    return "\n".join(lines) + "\n"


def confusion_csv(matrix: Confusion) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["true", *matrix.groups, "total", "recall"])
    for row, label in enumerate(matrix.labels):
        recall = matrix.recall(row)
        writer.writerow([label, *matrix.matrix[row].tolist(), int(matrix.totals[row]), _csv_value(round(recall, 6))])
    return buffer.getvalue()


def confusion_table(matrix: Confusion) -> str:
    """Markdown: one row per true class, one column per predicted class, then the row's total and recall."""
    lines = [
        "| true \\ predicted | " + " | ".join(matrix.groups) + " | total | recall % |",
        "|---|" + "---:|" * (len(matrix.groups) + 2),
    ]
    for row, label in enumerate(matrix.labels):
        counts = " | ".join(str(count) for count in matrix.matrix[row].tolist())
        lines.append(f"| {label} | {counts} | {int(matrix.totals[row])} | {percent(matrix.recall(row))} |")
    return "\n".join(lines) + "\n"


def percent(value: float) -> str:
    """A rate as a percentage with two decimals, as the paper's tables print it; `n/a` where undefined."""
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.2f}"


def _csv_value(value):
    return "" if isinstance(value, float) and math.isnan(value) else value


# ------------------------------------------------------------------------------------------- robustness


@dataclass(frozen=True)
class RobustnessRow:
    kind: str  # "clean", "noise", "blur", "jpeg"
    level: float | None
    transform: str  # the full input transform id (with any format re-encoding before it)
    n: int
    accuracy: float
    average_precision: float

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "level": self.level,
            "transform": self.transform,
            "n": self.n,
            "accuracy": self.accuracy,
            "average_precision": self.average_precision,
        }


def perturbation_grid(kinds: Sequence[str] = tuple(PAPER_PERTURBATIONS)) -> list[tuple[str, float]]:
    unknown = sorted(set(kinds) - set(PAPER_PERTURBATIONS))
    if unknown:
        raise ValueError(f"Unknown perturbation {', '.join(unknown)}; choose from {', '.join(PAPER_PERTURBATIONS)}.")
    return [(kind, level) for kind in kinds for level in PAPER_PERTURBATIONS[kind]]


def perturbation_kinds(text: str) -> list[str]:
    """The kinds of a comma-separated `--perturbations` list, checked (ValueError for none or an unknown one)."""
    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    if not kinds:
        raise ValueError("--perturbations needs at least one of noise, blur, jpeg.")
    perturbation_grid(kinds)
    return kinds


def robustness(
    samples: Sequence[Sample],
    detector: Detector,
    cache: ArtifactCache,
    head: Head,
    *,
    base: Chain = IDENTITY,
    kinds: Sequence[str] = tuple(PAPER_PERTURBATIONS),
    on_level: Callable[[str, float], Callable[[int], None]] = lambda kind, level: lambda n: None,
    **extract_options,
) -> list[RobustnessRow]:
    """AP and accuracy on the same images after each perturbation of the paper's grid (Fig. 4).

    Each perturbed set is extracted (and cached) like any other input, keyed by its transform, so rerunning
    the grid, or the grid of another head on the same models, computes nothing again.
    """
    rows = []
    for kind, level in perturbation_grid(kinds):
        transform = Chain((*base.steps, perturbation(kind, level)))
        progress = on_level(kind, level)
        features = extract(samples, detector, cache, transform=transform, progress=progress, **extract_options)
        rows.append(_robustness_row(kind, level, effective_transform(detector, transform), features, head))
    return rows


def _robustness_row(kind: str, level: float | None, transform: Chain, features: FeatureSet, head: Head):
    scores, labels = score(features, head), features.labels.numpy()
    return RobustnessRow(
        kind=kind,
        level=level,
        transform=transform.id,
        n=len(labels),
        accuracy=detection_metrics.accuracy(labels, scores, head.metadata.threshold),
        average_precision=detection_metrics.average_precision(labels, scores),
    )


def clean_row(report: EvalReport, base: Chain = IDENTITY) -> RobustnessRow:
    """The unperturbed reference point of the robustness grid, from the main evaluation."""
    overall = report.overall
    return RobustnessRow("clean", None, base.id, overall.n, overall.accuracy, overall.average_precision)


def robustness_csv(rows: Sequence[RobustnessRow]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(RobustnessRow.__dataclass_fields__), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if value is None else _csv_value(value) for key, value in row.to_dict().items()})
    return buffer.getvalue()


def robustness_table(rows: Sequence[RobustnessRow]) -> str:
    lines = ["| perturbation | level | images | ACC % | AP % |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        level = "" if row.level is None else f"{row.level:g}"
        lines.append(f"| {row.kind} | {level} | {row.n} | {percent(row.accuracy)} | {percent(row.average_precision)} |")
    return "\n".join(lines) + "\n"
