"""Unit tests for pipeline.lab.plots: every figure is a readable PNG, and the t-SNE helper is reproducible."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipeline.lab.plots import plot_curves, plot_embedding, plot_robustness, tsne_2d


def assert_png(path) -> None:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 100 and height > 100


def labelled_scores(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    return labels, np.clip(rng.normal(0.35 + 0.3 * labels, 0.2), 0, 1)


def test_plot_curves_writes_both_figures_into_new_folders(tmp_path):
    curves = {f"generator{index}": labelled_scores(index) for index in range(20)}
    curves["only-real"] = (np.zeros(10, dtype=int), np.linspace(0, 1, 10))  # single class: "n/a" in the legend
    pr_path, roc_path = tmp_path / "a" / "pr.png", tmp_path / "b" / "roc.png"
    plot_curves(curves, pr_path, roc_path)
    assert_png(pr_path)
    assert_png(roc_path)


def test_plot_curves_refuses_nothing_to_plot(tmp_path):
    with pytest.raises(ValueError):
        plot_curves({}, tmp_path / "pr.png", tmp_path / "roc.png")


def clustered_features(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    return rng.normal(size=(n, 16)) + 3.0 * labels[:, None], labels


def test_tsne_2d_is_finite_and_reproducible():
    features, _ = clustered_features(40)
    first, second = tsne_2d(features, seed=3), tsne_2d(features, seed=3)
    assert first.shape == (40, 2)
    assert np.isfinite(first).all()
    assert np.array_equal(first, second)


@pytest.mark.parametrize(("n", "d"), [(1, 4), (3, 8), (3, 1), (4, 2)])
def test_tsne_2d_falls_back_to_pca_for_few_points(n, d):
    features = np.random.default_rng(n).normal(size=(n, d))
    points = tsne_2d(features)
    assert points.shape == (n, 2)
    assert np.isfinite(points).all()
    assert np.array_equal(points, tsne_2d(features))


def test_pca_fallback_keeps_the_spread_of_the_data():
    # Three points on a line: the first coordinate must carry all of the distances between them.
    features = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0], [3.0, 3.0, 0.0]])
    points = tsne_2d(features)
    distances = np.linalg.norm(features[:, None] - features[None], axis=-1)
    assert np.abs(points[:, None, 0] - points[None, :, 0]) == pytest.approx(distances)
    assert points[:, 1] == pytest.approx(0.0)


def test_tsne_2d_refuses_bad_shapes():
    with pytest.raises(ValueError):
        tsne_2d(np.zeros(5))
    with pytest.raises(ValueError):
        tsne_2d(np.full((6, 2), np.nan))


def test_plot_embedding_writes_a_png(tmp_path):
    features, labels = clustered_features(30)
    path = tmp_path / "deep" / "tsne.png"
    plot_embedding(tsne_2d(features), labels, path, title="ITEM features")
    assert_png(path)


def test_plot_embedding_refuses_mismatched_labels(tmp_path):
    with pytest.raises(ValueError):
        plot_embedding(np.zeros((4, 2)), [0, 1], tmp_path / "x.png", title="x")


@pytest.mark.parametrize("clean_ap", [0.98, None, float("nan")])
def test_plot_robustness_writes_a_png(tmp_path, clean_ap):
    results = {
        "noise": [(0.001, 0.97), (0.005, 0.9), (0.01, 0.8)],
        "blur": [(1, 0.95), (2, 0.85), (3, 0.7)],
        "jpeg": [(75, 0.9), (50, 0.8), (25, float("nan"))],
    }
    path = tmp_path / "figures" / "robustness.png"
    plot_robustness(results, clean_ap, path)
    assert_png(path)
