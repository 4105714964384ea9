import pytest
import torch

from pipeline.core.head import HeadMetadata
from pipeline.lab.detection_metrics import accuracy
from pipeline.lab.training import TrainConfig, train_head

METADATA = HeadMetadata(profile="tiny", stage_versions={}, input_dim=16)


DIRECTION = torch.nn.functional.normalize(torch.randn(16, generator=torch.Generator().manual_seed(99)), dim=0)


def clusters(seed: int, n: int = 64):
    """Two Gaussian clusters 3 sigma apart along a fixed direction; `seed` draws the noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    features = torch.randn(n, 16, generator=generator) + 3 * labels[:, None] * DIRECTION
    return features, labels


def test_same_data_and_seed_give_the_same_head():
    features, labels = clusters(0)
    config = TrainConfig(epochs=5, hidden=8, seed=3)
    assert (
        train_head(features, labels, METADATA, config).version == train_head(features, labels, METADATA, config).version
    )
    other = train_head(features, labels, METADATA, TrainConfig(epochs=5, hidden=8, seed=4))
    assert other.version != train_head(features, labels, METADATA, config).version


def test_learns_separable_data_and_records_a_summary():
    features, labels = clusters(1)
    head = train_head(features, labels, METADATA, TrainConfig(hidden=16, batch_size=8))
    test_features, test_labels = clusters(2)
    assert accuracy(test_labels, head.predict(test_features), 0.5) >= 0.9
    summary = head.metadata.training
    assert summary["epochs"] == 50 and summary["lr"] == 1e-3 and summary["weight_decay"] == 1e-3
    assert summary["n_train"] == 64 and summary["train_accuracy"] >= 0.9


def test_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        train_head(torch.zeros(3, 16), torch.zeros(2), METADATA, TrainConfig())


def test_validation_loss_of_a_two_output_head_is_its_cross_entropy():
    features, labels = clusters(3)
    val_features, val_labels = clusters(4)
    head = train_head(
        features, labels, METADATA, TrainConfig(epochs=2, hidden=8), validation=(val_features, val_labels)
    )
    with torch.inference_mode():
        expected = float(torch.nn.functional.cross_entropy(head.module(val_features), val_labels))
    assert head.metadata.training["validation"]["loss"] == pytest.approx(expected, abs=1e-6)
    assert "classes" not in head.metadata.training  # a two-output head's summary is as before
