"""`item demo`: the whole method, offline, on the tiny profile, in well under a minute on a laptop CPU.

Makes a labelled set of two synthetic families, extracts misalignment features for all of it once, trains a
head on one part, and scores the rest from the stored features (the reuse the worker relies on).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.core.detector import Detector
from pipeline.core.head import HeadMetadata
from pipeline.core.imaging import decode_image
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile
from pipeline.core.results import Detection
from pipeline.lab.detection_metrics import accuracy
from pipeline.lab.synthetic import FAMILIES, make_image
from pipeline.lab.training import TrainConfig, train_head


@dataclass
class DemoReport:
    head_path: Path
    image_dir: Path
    n_train: int
    test: list[tuple[Path, int, Detection]]  # path, true label, detection

    @property
    def accuracy(self) -> float:
        labels = torch.tensor([label for _, label, _ in self.test])
        scores = torch.tensor([d.p_fake for _, _, d in self.test])
        return accuracy(labels, scores, self.test[0][2].threshold) if self.test else float("nan")


def write_dataset(folder: Path, per_family: int, seed: int) -> list[tuple[Path, int]]:
    """PNG files under folder/<family>/, label = index of the family in FAMILIES."""
    items = []
    for label, family in enumerate(FAMILIES):
        (folder / family).mkdir(parents=True, exist_ok=True)
        for index in range(per_family):
            path = folder / family / f"{family}-{index:03d}.png"
            make_image(family, seed * 100_003 + label * 10_007 + index).save(path)
            items.append((path, label))
    return items


def run_demo(
    out: Path,
    store: ModelStore,
    *,
    per_family: int = 16,
    train_fraction: float = 0.5,
    seed: int = 0,
    batch_size: int = 8,
    train: TrainConfig = TrainConfig(hidden=32),
    progress: Callable[[int], None] = lambda n: None,
) -> DemoReport:
    items = write_dataset(out / "images", per_family, seed)
    detector = Detector(get_profile("tiny"), store, device="cpu")
    decoded = [decode_image(path.read_bytes()) for path, _ in items]
    artifacts = []
    for start in range(0, len(decoded), batch_size):
        batch = decoded[start : start + batch_size]
        artifacts += [analysis.artifacts for analysis in detector.analyze(batch)]
        progress(len(batch))

    n_train_each = max(1, int(per_family * train_fraction))
    is_train = [index % per_family < n_train_each for index in range(len(items))]
    features = torch.stack([detector.representation(a.features) for a in artifacts])
    labels = torch.tensor([label for _, label in items])
    train_rows = torch.tensor(is_train)
    metadata = HeadMetadata(profile="tiny", stage_versions=detector.stage_versions, input_dim=features.shape[1])
    head = train_head(features[train_rows], labels[train_rows], metadata, train)
    head_path = head.save(out / "head.safetensors")

    detector.use_head(head)
    test_index = [index for index, train_row in enumerate(is_train) if not train_row]
    detections = detector.detect([None] * len(test_index), [artifacts[i] for i in test_index])
    for index, detection in zip(test_index, detections, strict=True):
        detection.sha256 = decoded[index].sha256
    test = [(items[i][0], items[i][1], d) for i, d in zip(test_index, detections, strict=True)]
    return DemoReport(head_path=head_path, image_dir=out / "images", n_train=int(train_rows.sum()), test=test)
