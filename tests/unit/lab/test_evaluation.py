"""Evaluation tables and calibration, checked against scikit-learn and against their own definitions."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, average_precision_score

from pipeline.core.head import Head, HeadMetadata
from pipeline.lab.calibration import calibrate, real_samples
from pipeline.lab.datasets import DatasetError, Sample
from pipeline.lab.evaluation import evaluate, metrics_csv, paper_table, score, scores_csv
from pipeline.lab.features import FeatureSet
from pipeline.lab.training import TrainConfig, train_head

DIM = 12


def feature_set(groups: dict[str, tuple[int, int]], seed: int, separation: float = 1.5) -> FeatureSet:
    """Overlapping Gaussian classes per group (so AP and ACC are neither 0 nor 1), `n_real, n_fake` each."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.nn.functional.normalize(torch.ones(DIM), dim=0)
    samples, rows = [], []
    for group, (n_real, n_fake) in groups.items():
        for label, count in ((0, n_real), (1, n_fake)):
            for index in range(count):
                samples.append(Sample(Path(f"/{group}/{label}/{index}.png"), label, group))
                rows.append(torch.randn(DIM, generator=generator) + separation * label * direction)
    global_ = torch.stack(rows)
    return FeatureSet(
        samples=samples,
        sha256s=[f"{i:064x}" for i in range(len(samples))],
        formats=["PNG"] * len(samples),
        global_=global_,
        local=global_ * 0.5,
        n_objects=torch.zeros(len(samples), dtype=torch.long),
    )


@pytest.fixture(scope="module")
def head() -> Head:
    train = feature_set({"train": (60, 60)}, seed=0)
    metadata = HeadMetadata("tiny", {}, DIM, hidden=16)
    return train_head(train.representation(), train.labels, metadata, TrainConfig(epochs=30, hidden=16, seed=0))


def test_table_rows_match_an_independent_computation(head):
    groups = {"progan": (30, 25), "ldm": (20, 40), "dalle": (15, 15)}
    features = feature_set(groups, seed=1)
    report = evaluate(features, head)
    assert [row.group for row in report.groups] == list(groups)
    scores, labels = report.scores, features.labels.numpy()
    names = np.array(features.groups)
    for row in report.groups:
        rows = names == row.group
        assert (row.n_real, row.n_fake) == groups[row.group] and row.n == sum(groups[row.group])
        assert row.average_precision == pytest.approx(average_precision_score(labels[rows], scores[rows]))
        predicted = (scores[rows] >= head.metadata.threshold).astype(int)
        assert row.accuracy == pytest.approx(accuracy_score(labels[rows], predicted))
        assert 0.5 < row.average_precision < 1.0  # overlapping classes: a real test of the ranking, not 0 or 1
    assert report.mean.accuracy == pytest.approx(np.mean([row.accuracy for row in report.groups]))
    assert report.overall.average_precision == pytest.approx(average_precision_score(labels, scores))
    assert report.overall.n == len(labels)


def test_scores_use_the_heads_weights(head):
    features = feature_set({"g": (5, 5)}, seed=2)
    global_only = Head(head.module, HeadMetadata("tiny", {}, DIM, hidden=16, w1=1.0, w2=0.0))
    expected = global_only.predict(features.global_).numpy()
    assert np.allclose(score(features, global_only), expected)
    assert not np.allclose(score(features, head), expected)


def test_written_tables_hold_every_group_and_image(head):
    features = feature_set({"a": (4, 6), "b": (5, 5)}, seed=3)
    report = evaluate(features, head)
    rows = list(csv.DictReader(io.StringIO(metrics_csv(report.rows()))))
    assert [row["group"] for row in rows] == ["a", "b", "mean", "all"]
    assert [int(row["n"]) for row in rows] == [10, 10, 20, 20]
    per_image = list(csv.DictReader(io.StringIO(scores_csv(report))))
    assert len(per_image) == 20 and {row["group"] for row in per_image} == {"a", "b"}
    table = paper_table(report)
    assert table.splitlines()[0].count("ACC") == 3  # a, b and the mean, as in the paper's tables


def test_a_one_class_group_has_no_ap_but_keeps_its_accuracy(head):
    report = evaluate(feature_set({"real-only": (6, 0), "both": (5, 5)}, seed=4), head)
    real_only = report.groups[0]
    assert np.isnan(real_only.average_precision) and not np.isnan(real_only.accuracy)
    assert not np.isnan(report.mean.average_precision)  # the mean skips what is undefined
    assert ",," in metrics_csv(report.rows())  # written as an empty cell, not "nan"


@pytest.mark.parametrize("target", [0.01, 0.05, 0.2])
def test_calibration_meets_its_target_on_the_calibration_set(head, target):
    reals = feature_set({"cal": (400, 0)}, seed=5)
    scores = score(reals, head)
    calibrated, report = calibrate(head, scores, target)
    rescored = score(reals, calibrated)  # through the calibrated head, as a deployment would score
    flagged = (rescored >= calibrated.metadata.threshold).mean()
    assert flagged <= target and report.fpr == pytest.approx(flagged)
    assert flagged > target - 0.01  # the lowest threshold that meets it: not needlessly strict
    assert report.fpr_upper_95 >= report.fpr and report.previous_threshold == head.metadata.threshold
    assert calibrated.version != head.version and calibrated.metadata.training["calibration"]["target_fpr"] == target


def test_a_calibrated_head_keeps_its_threshold_on_disk(head, tmp_path):
    calibrated, report = calibrate(head, score(feature_set({"cal": (50, 0)}, seed=6), head), 0.1)
    assert any("too few" in warning for warning in report.warnings) is False  # 50 >= 3 / 0.1
    loaded = Head.load(calibrated.save(tmp_path / "calibrated"))
    assert loaded.metadata.threshold == report.threshold and loaded.version == calibrated.version
    _, small = calibrate(head, score(feature_set({"cal": (20, 0)}, seed=6), head), 0.01)
    assert any("too few" in warning for warning in small.warnings)


def test_real_samples_from_a_plain_folder_or_a_datasets_real_half(tmp_path):
    (tmp_path / "plain").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "plain" / name).write_bytes(b"x")
    assert [s.path.name for s in real_samples(tmp_path / "plain")] == ["a.png", "b.jpg"]
    for folder in ("bench/gan/0_real", "bench/gan/1_fake"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "x.png").write_bytes(b"x")
    assert [s.path.parent.name for s in real_samples(tmp_path / "bench")] == ["0_real"]
    with pytest.raises(DatasetError):
        real_samples(tmp_path / "nowhere")
