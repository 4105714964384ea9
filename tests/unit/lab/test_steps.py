"""The steps `item train | eval` take between extraction and the head: weights, the split, the class checks, the
perturbation list, and the NaN-free summaries."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from pipeline.core.head import REAL_GROUP
from pipeline.lab.datasets import Sample
from pipeline.lab.evaluation import perturbation_kinds
from pipeline.lab.features import FeatureSet
from pipeline.lab.summaries import finite, group_counts
from pipeline.lab.training import check_classes, representation_weights, split_features


def feature_set(rows: list[tuple[str, int]]) -> FeatureSet:
    """One sample per (group, label), with its row index as its features."""
    samples = [Sample(Path(f"{group}/{index}.png"), label, group) for index, (group, label) in enumerate(rows)]
    values = torch.arange(len(rows), dtype=torch.float32)[:, None].repeat(1, 4)
    return FeatureSet(
        samples, [f"sha{index}" for index in range(len(rows))], ["PNG"] * len(rows), values, values,
        torch.zeros(len(rows), dtype=torch.long),
    )  # fmt: skip


def test_representation_weights_follow_the_ablation_unless_given():
    assert representation_weights("both", None, None) == (1.0, 1.0)
    assert representation_weights("global", None, None) == (1.0, 0.0)
    assert representation_weights("local", None, 0.5) == (0.0, 0.5)
    with pytest.raises(ValueError, match="--representation must be one of both, global, local, not 'all'"):
        representation_weights("all", None, None)


def test_split_features_keeps_every_row_once_and_its_features_with_it():
    features = feature_set([(group, label) for group in ("a", "b") for label in (0, 1) for _ in range(10)])
    train, val = split_features(features, 0.2, seed=0)
    assert len(train.samples) + len(val.samples) == 40 and len(val.samples) == 8
    assert sorted(train.sha256s + val.sha256s) == sorted(features.sha256s)
    for part in (train, val):
        rows = [int(sha.removeprefix("sha")) for sha in part.sha256s]
        assert part.global_[:, 0].tolist() == rows
        assert [sample.path for sample in part.samples] == [features.samples[row].path for row in rows]


def test_check_classes_needs_both_classes_and_for_attribution_every_class():
    check_classes(feature_set([("a", 0), ("a", 1)]))
    with pytest.raises(ValueError, match="no readable fake images"):
        check_classes(feature_set([("a", 0), ("b", 0)]))
    with pytest.raises(ValueError, match="at least 2 generator folders; found only 'a'"):
        check_classes(feature_set([("a", 0), ("a", 1)]), [REAL_GROUP, "a"])
    with pytest.raises(ValueError, match="no readable images of b"):
        check_classes(feature_set([("a", 0), ("a", 1)]), [REAL_GROUP, "a", "b"])
    check_classes(feature_set([("a", 0), ("a", 1), ("b", 1)]), [REAL_GROUP, "a", "b"])


def test_perturbation_kinds_are_checked_before_any_work():
    assert perturbation_kinds(" jpeg, blur ,") == ["jpeg", "blur"]
    with pytest.raises(ValueError, match="needs at least one"):
        perturbation_kinds(" , ")
    with pytest.raises(ValueError, match="Unknown perturbation rain"):
        perturbation_kinds("noise,rain")


def test_summaries_count_groups_and_carry_no_nan():
    assert group_counts(feature_set([("a", 0), ("b", 1), ("a", 1)])) == {
        "a": {"real": 1, "fake": 1},
        "b": {"real": 0, "fake": 1},
    }
    assert finite({"ap": math.nan, "rows": [(1.0, math.nan)], "n": 3}) == {"ap": None, "rows": [[1.0, None]], "n": 3}
