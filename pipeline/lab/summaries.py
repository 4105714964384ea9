"""What `item features | train | eval | calibrate` report, as plain dicts: the `--json` line of each command,
the training record a head keeps, and `item eval`'s `summary.json`.

NaN (the AP of a one-class group) becomes null in them (`finite`): JSON has no NaN, and strict parsers reject it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.core.head import Head
    from pipeline.lab.calibration import CalibrationReport
    from pipeline.lab.datasets import Dataset
    from pipeline.lab.evaluation import EvalReport, RobustnessRow
    from pipeline.lab.features import FeatureSet
    from pipeline.lab.runs import Run


def extraction_summary(extracted: FeatureSet, dataset: Dataset) -> dict:
    """How an extraction went: images kept, computed and reused, unreadable (by error code), skipped entries."""
    return {
        "images": len(extracted.samples),
        "computed": extracted.computed,
        "reused": extracted.reused,
        "unreadable": len(extracted.failures),
        "unreadable_by_code": dict(Counter(f.code for f in extracted.failures)),
        "skipped_entries": len(dataset.problems),
    }


def group_counts(extracted: FeatureSet) -> dict[str, dict[str, int]]:
    """Real and fake images per group, in the order each group first appears."""
    counts: dict[str, dict[str, int]] = {}
    for sample in extracted.samples:
        row = counts.setdefault(sample.group, {"real": 0, "fake": 0})
        row["fake" if sample.label else "real"] += 1
    return counts


def features_summary(profile: str, extracted: FeatureSet, dataset: Dataset) -> dict:
    return {"profile": profile, **extraction_summary(extracted, dataset), "groups": group_counts(extracted)}


def training_record(
    data: Sequence[Path],
    val: Sequence[Path] | None,
    val_fraction: float,
    seed: int,
    representation: str,
    extracted: FeatureSet,
    dataset: Dataset,
) -> dict:
    """What a head's training summary adds to the recipe: the datasets, the validation, the extraction."""
    return {
        "datasets": [str(path) for path in data],
        "validation_source": [str(path) for path in val] if val else f"split {val_fraction:g} (seed {seed})",
        "representation": representation,
        "features": extraction_summary(extracted, dataset),
    }


def train_summary(head: Head, weights_path: Path, profile: str, groups: list[str] | None) -> dict:
    summary = {"head": str(weights_path), "version": head.version, "profile": profile, **head.metadata.training}
    summary["input_transform"] = head.metadata.input_transform
    if groups:
        summary["groups"] = groups
    return summary


def eval_summary(
    head_path: Path,
    head: Head,
    run: Run,
    report: EvalReport,
    robustness: Sequence[RobustnessRow],
    extracted: FeatureSet,
    dataset: Dataset,
    warning: str | None,
    written: dict[str, Path],
) -> dict:
    """`item eval`'s summary: the head, its metrics, robustness, what extraction did and the files written."""
    summary = {
        "head": str(head_path),
        "head_version": head.version,
        "threshold": head.metadata.threshold,
        "input_transform": run.effective_transform.id,
        "metrics": [row.to_dict() for row in report.rows()],
        "robustness": [row.to_dict() for row in robustness],
        "features": extraction_summary(extracted, dataset),
        "format_warning": warning,
        "files": {key: str(path) for key, path in written.items()},
    }
    if report.attribution:
        summary["attribution"] = report.attribution.to_dict()
    return summary


def calibration_summary(weights_path: Path, calibrated: Head, report: CalibrationReport) -> dict:
    return {"head": str(weights_path), "version": calibrated.version, **report.to_dict()}


def finite(value):
    """NaN as None, through dicts, lists and tuples: JSON has no NaN, and strict parsers reject it."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value
