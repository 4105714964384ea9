"""Attribution heads in the lab: classes from the data, training on them, the confusion matrix, its files."""

from __future__ import annotations

import csv
import io
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.head import Head, HeadMetadata, mlp
from pipeline.lab.calibration import calibrate
from pipeline.lab.datasets import Sample
from pipeline.lab.detection_metrics import accuracy
from pipeline.lab.evaluation import OTHER, attribution, confusion, confusion_csv, confusion_table, evaluate, score
from pipeline.lab.features import FeatureSet
from pipeline.lab.plots import plot_confusion
from pipeline.lab.training import (
    UNSEEN,
    TrainConfig,
    attribution_accuracy,
    attribution_groups,
    class_indices,
    train_head,
)

DIM = 16
GROUPS = ["real", "gen-a", "gen-b"]
CENTRES = 4 * torch.eye(DIM)[:3]  # one per class, 4·√2 sigma apart: clearly separated


def clusters(seed: int, per_class: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    """Isotropic Gaussian clusters around CENTRES, one per class of GROUPS; `seed` draws the noise."""
    generator = torch.Generator().manual_seed(seed)
    classes = torch.arange(len(GROUPS)).repeat_interleave(per_class)
    return CENTRES[classes] + torch.randn(len(classes), DIM, generator=generator), classes


def nearest_centroid(train: tuple[torch.Tensor, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """Scores by closeness to each class's training centroid: near the best any classifier can do on isotropic
    clusters, so what a working head should reach on the same data. Shaped like `Head.attribute`."""
    centroids = torch.stack([train[0][train[1] == index].mean(dim=0) for index in range(len(GROUPS))])
    return (-torch.cdist(features, centroids)).softmax(dim=-1)


@pytest.fixture(scope="module")
def trained() -> tuple[Head, tuple[torch.Tensor, torch.Tensor]]:
    train, validation = clusters(0), clusters(1)
    metadata = HeadMetadata("tiny", {}, DIM, groups=GROUPS)
    head = train_head(*train, metadata, TrainConfig(hidden=16, batch_size=8), validation=validation)
    return head, train


def feature_set(rows: list[tuple[torch.Tensor, int, str]]) -> FeatureSet:
    """A set of (D_g, label, group) rows with D_l = 0, so D = D_g for a head with w1 = 1."""
    samples = [
        Sample(Path(f"/{group}/{label}/{index}.png"), label, group) for index, (_, label, group) in enumerate(rows)
    ]
    global_ = torch.stack([row for row, _, _ in rows]).float()
    return FeatureSet(
        samples=samples,
        sha256s=[f"{index:064x}" for index in range(len(rows))],
        formats=["PNG"] * len(rows),
        global_=global_,
        local=torch.zeros_like(global_),
        n_objects=torch.zeros(len(rows), dtype=torch.long),
    )


# ------------------------------------------------------------------------------------------ classes


def test_classes_are_real_then_the_fake_generators_sorted():
    samples = [
        Sample(Path("a"), 0, "zeta"),  # a real sample's folder names no class
        Sample(Path("b"), 1, "midj"),
        Sample(Path("c"), 1, "dalle"),
        Sample(Path("d"), 1, "midj"),
        Sample(Path("e"), 0, "only-real"),
    ]
    groups = attribution_groups(samples)
    assert groups == ["real", "dalle", "midj"]
    assert class_indices(samples, groups).tolist() == [0, 2, 1, 2, 0]
    unseen = [Sample(Path("f"), 1, "sdxl"), Sample(Path("g"), 0, "sdxl")]
    assert class_indices(unseen, groups).tolist() == [UNSEEN, 0]


# ------------------------------------------------------------------------------------------ training


def test_three_separated_clusters_are_attributed_as_well_as_their_centroids(trained):
    head, train = trained
    (features, classes), fake = clusters(2), (clusters(2)[1] > 0).long()
    reference = nearest_centroid(train, features)
    reference_accuracy = attribution_accuracy(reference, classes)
    assert reference_accuracy > 0.9  # the data are what the test says: clearly separated
    assert attribution_accuracy(head.attribute(features), classes) >= reference_accuracy - 0.05
    reference_detection = accuracy(fake, reference.argmax(dim=-1) > 0, 0.5)
    assert accuracy(fake, head.predict(features), 0.5) >= reference_detection - 0.05


def test_the_summary_counts_each_class_and_validates_on_both_tasks(trained):
    head, (_, classes) = trained
    summary = head.metadata.training
    assert summary["classes"] == dict(zip(GROUPS, torch.bincount(classes).tolist(), strict=True))
    assert summary["n_train"] == len(classes) and summary["n_fake"] == int((classes > 0).sum())
    validation_features, validation_classes = clusters(1)
    expected = attribution_accuracy(head.attribute(validation_features), validation_classes)
    assert summary["validation"]["attribution_accuracy"] == pytest.approx(expected, abs=1e-6)
    fake = (validation_classes > 0).long()
    assert summary["validation"]["accuracy"] == pytest.approx(accuracy(fake, head.predict(validation_features), 0.5))


def test_attribution_accuracy_sets_real_aside_and_skips_unseen_generators():
    # rows: a fake of class 1 the head calls real but ranks class 1 above 2; a fake of 2 put down to 1; an unseen
    # fake; a real image. Only the first two count, and only the first is right.
    probabilities = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.5, 0.4], [0.1, 0.1, 0.8], [0.9, 0.05, 0.05]])
    classes = torch.tensor([1, 2, UNSEEN, 0])
    assert attribution_accuracy(probabilities, classes) == pytest.approx(1 / 2)
    assert np.isnan(attribution_accuracy(probabilities[3:], classes[3:]))


def test_rejects_labels_the_head_has_no_output_for():
    features, classes = clusters(3, per_class=2)
    metadata = HeadMetadata("tiny", {}, DIM, groups=GROUPS)
    for wrong in (classes + 1, torch.where(classes == 2, UNSEEN, classes)):
        with pytest.raises(ValueError, match="class indices"):
            train_head(features, wrong, metadata, TrainConfig(epochs=1, hidden=4))


# ------------------------------------------------------------------------------------------ confusion


def test_confusion_counts_each_pair_and_puts_unseen_generators_in_other():
    true = ["real", "real", "gen-a", "gen-a", "gen-a", "gen-b", "sdxl", "sdxl", "real"]
    predicted = ["real", "gen-b", "gen-a", "gen-a", "real", "gen-a", "gen-b", "real", "real"]
    matrix = confusion(true, predicted, GROUPS)
    assert matrix.labels == [*GROUPS, OTHER] and matrix.groups == GROUPS
    rows = [label if label in GROUPS else OTHER for label in true]
    pairs = Counter(zip(rows, predicted, strict=True))
    for row, label in enumerate(matrix.labels):
        assert matrix.matrix[row].tolist() == [pairs[(label, column)] for column in GROUPS]
    assert matrix.totals.tolist() == [rows.count(label) for label in matrix.labels]
    known = [(t, p) for t, p in zip(true, predicted, strict=True) if t in GROUPS]
    assert matrix.accuracy == pytest.approx(sum(t == p for t, p in known) / len(known))
    assert np.isnan(matrix.recall(matrix.labels.index(OTHER)))


def test_confusion_files_hold_the_matrix_with_totals_and_recall():
    true = ["real", "gen-a", "gen-a", "gen-b", "unseen"]
    predicted = ["real", "gen-a", "gen-b", "gen-b", "gen-a"]
    matrix = confusion(true, predicted, GROUPS)
    rows = list(csv.reader(io.StringIO(confusion_csv(matrix))))
    assert rows[0] == ["true", *GROUPS, "total", "recall"]
    assert [row[0] for row in rows[1:]] == matrix.labels
    for index, row in enumerate(rows[1:]):
        counts = [int(cell) for cell in row[1 : 1 + len(GROUPS)]]
        assert counts == matrix.matrix[index].tolist() and int(row[-2]) == sum(counts)
        if row[0] == OTHER:
            assert row[-1] == ""  # no column of its own: no recall
            continue
        own = [p for t, p in zip(true, predicted, strict=True) if t == row[0]]
        assert float(row[-1]) == pytest.approx(own.count(row[0]) / len(own))
    table = confusion_table(matrix).splitlines()
    assert len(table) == 2 + len(matrix.labels) and all(group in table[0] for group in GROUPS)
    assert table[3].startswith("| gen-a | 0 | 1 | 1 | 2 | 50.00 |")


def identity_head(groups: list[str]) -> Head:
    """A head whose logits are its input (ReLU'd): the predicted class is the largest coordinate of D."""
    module = mlp(len(groups), len(groups), len(groups))
    with torch.no_grad():
        for layer in (module[0], module[2]):
            layer.weight.copy_(torch.eye(len(groups)))
            layer.bias.zero_()
    return Head(module, HeadMetadata("tiny", {}, len(groups), hidden=len(groups), w1=1.0, w2=0.0, groups=groups))


def test_attribution_takes_the_true_class_from_label_and_folder():
    head = identity_head(GROUPS)
    one_hot = torch.eye(3)
    rows = [
        (one_hot[0], 0, "gen-a"),  # real in a generator's folder, called real
        (one_hot[1], 0, "gen-b"),  # real, called gen-a
        (one_hot[1], 1, "gen-a"),  # right
        (one_hot[1], 1, "gen-b"),  # gen-b called gen-a
        (one_hot[2], 1, "sdxl"),  # unseen, called gen-b
    ]
    matrix = attribution(feature_set(rows), head)
    assert matrix.labels == [*GROUPS, OTHER]
    assert matrix.matrix.tolist() == [[1, 1, 0], [0, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert matrix.to_dict()["accuracy"] == pytest.approx(2 / 4)


def test_eval_of_an_attribution_head_keeps_p_fake_and_adds_the_matrix(trained):
    head, _ = trained
    rows, classes = clusters(4, per_class=10)
    folders = ["gen-b", "gen-a", "sdxl"]  # reals in a generator's folder; the last class a generator never seen
    features = feature_set([(row, int(c > 0), folders[c]) for row, c in zip(rows, classes.tolist(), strict=True)])
    report = evaluate(features, head)
    assert np.allclose(report.scores, 1 - head.attribute(features.representation()).numpy()[:, 0], atol=1e-6)
    assert report.attribution.labels == [*GROUPS, OTHER]
    assert int(report.attribution.matrix.sum()) == len(features.samples)
    assert report.attribution.totals.tolist() == [10, 10, 0, 10]  # real, gen-a, no gen-b, the unseen sdxl
    train_features, train_classes = clusters(0, per_class=4)
    binary = train_head(
        train_features, (train_classes > 0).long(), HeadMetadata("tiny", {}, DIM), TrainConfig(epochs=1)
    )
    assert evaluate(features, binary).attribution is None


def test_confusion_figure_is_a_png_and_refuses_a_mismatched_matrix(tmp_path):
    matrix = confusion(["real", "gen-a", "x"], ["real", "gen-b", "gen-a"], GROUPS)
    path = tmp_path / "plots" / "confusion.png"
    plot_confusion(matrix.matrix, matrix.labels, matrix.groups, path)
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 100
    with pytest.raises(ValueError, match="one row per true"):
        plot_confusion(matrix.matrix, GROUPS, GROUPS, tmp_path / "wrong.png")


# ------------------------------------------------------------------------------------------ calibration


def test_an_attribution_head_calibrates_like_any_head(trained, tmp_path):
    head, _ = trained
    reals = feature_set([(row, 0, "cal") for row in clusters(5, per_class=100)[0][:100]])
    calibrated, report = calibrate(head, score(reals, head), 0.05)
    assert report.fpr <= 0.05 and calibrated.metadata.groups == GROUPS
    loaded = Head.load(calibrated.save(tmp_path / "calibrated"))
    assert loaded.attributes and loaded.version == calibrated.version
    flagged = (score(reals, loaded) >= loaded.metadata.threshold).mean()
    assert flagged == pytest.approx(report.fpr)
