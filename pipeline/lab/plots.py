"""Figures for `item eval`, written as PNG files on machines without a display.

Each figure is a `matplotlib.figure.Figure` drawn on its own Agg canvas rather than through pyplot: no global
figure registry to leak memory across a long evaluation, and no dependence on whatever backend the machine
is configured for. matplotlib and scikit-learn are imported inside the functions so that the CLI starts fast.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from pipeline.lab import detection_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 120
LEGEND_FONT_SIZE = 7
SINGLE_THREAD_TSNE_BELOW = 200  # points; see tsne_2d
REAL_COLOR, FAKE_COLOR = "tab:blue", "tab:red"
_KIND_TITLES = {"noise": "Gaussian noise (σ)", "blur": "Gaussian blur (σ, pixels)", "jpeg": "JPEG quality"}


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height))
    FigureCanvasAgg(figure)  # attaches itself to the figure: PNG output without pyplot or a display
    return figure


def _save(figure: Figure, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=DPI, bbox_inches="tight")  # "tight" keeps a legend placed below the axes
    figure.clear()  # nothing else holds a reference; clearing frees the artists now rather than at collection


def _format_score(name: str, value: float) -> str:
    return f"{name} {value:.3f}" if np.isfinite(value) else f"{name} n/a"


def _line_colors(count: int) -> list:
    """The default 10-colour cycle while it suffices; tab20 for up to 20 groups so no two lines share a colour."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [palette(index % palette.N) for index in range(count)]


def _legend_below(axes, count: int) -> None:
    columns = 1 if count <= 4 else 2 if count <= 10 else 3
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=columns, fontsize=LEGEND_FONT_SIZE, frameon=False)


def plot_curves(curves: dict[str, tuple[ArrayLike, ArrayLike]], pr_path: Path, roc_path: Path) -> None:
    """A precision-recall figure and a ROC figure with one line per entry of curves (name -> (labels, scores)).

    The legend gives each entry's AP or AUC; where that is undefined (one class only) it reads "n/a" and the
    line is left out of the figure.
    """
    if not curves:
        raise ValueError("plot_curves needs at least one entry of name -> (labels, scores); none were given.")
    pr_figure, roc_figure = _new_figure(6, 5), _new_figure(6, 5)
    pr_axes, roc_axes = pr_figure.add_subplot(), roc_figure.add_subplot()
    for (name, (labels, scores)), color in zip(curves.items(), _line_colors(len(curves)), strict=True):
        _draw_pr(pr_axes, name, labels, scores, color)
        _draw_roc(roc_axes, name, labels, scores, color)
    roc_axes.plot([0, 1], [0, 1], linestyle=":", color="grey", linewidth=0.8)  # chance
    for axes, (x_label, y_label), title in (
        (pr_axes, ("Recall", "Precision"), "Precision-recall"),
        (roc_axes, ("False-positive rate", "True-positive rate"), "ROC"),
    ):
        axes.set(xlabel=x_label, ylabel=y_label, title=title, xlim=(0, 1), ylim=(0, 1.02))
        axes.grid(alpha=0.3)
        _legend_below(axes, len(curves))
    _save(pr_figure, pr_path)
    _save(roc_figure, roc_path)


def _draw_pr(axes, name: str, labels: ArrayLike, scores: ArrayLike, color) -> None:
    ap = detection_metrics.average_precision(labels, scores)
    precision, recall, _ = detection_metrics.precision_recall_curve(labels, scores) if np.isfinite(ap) else ([], [], [])
    # drawstyle "steps-post" on recall-descending data draws the same steps that AP sums
    axes.plot(
        recall,
        precision,
        color=color,
        linewidth=1.2,
        drawstyle="steps-post",
        label=f"{name} ({_format_score('AP', ap)})",
    )


def _draw_roc(axes, name: str, labels: ArrayLike, scores: ArrayLike, color) -> None:
    auc = detection_metrics.roc_auc(labels, scores)
    fpr, tpr, _ = detection_metrics.roc_curve(labels, scores) if np.isfinite(auc) else ([], [], [])
    axes.plot(fpr, tpr, color=color, linewidth=1.2, label=f"{name} ({_format_score('AUC', auc)})")


def _pca_2d(features: np.ndarray) -> np.ndarray:
    centred = features - features.mean(axis=0)
    _, _, directions = np.linalg.svd(centred, full_matrices=False)
    # SVD may return either sign for a direction; fixing it makes the picture the same on every machine.
    signs = np.sign(directions[np.arange(len(directions)), np.abs(directions).argmax(axis=1)])
    projected = centred @ (directions * signs[:, None])[:2].T
    return np.pad(projected, ((0, 0), (0, 2 - projected.shape[1])))


def tsne_2d(features: np.ndarray, seed: int = 0) -> np.ndarray:
    """A 2-D t-SNE embedding of features (n, d), reproducible for a given seed.

    t-SNE needs a perplexity below the number of points, so fewer than 5 points get a PCA projection instead
    (padded with zeros to two columns when the data has fewer dimensions): a picture of 4 points says little
    either way, but `item eval` on a tiny set should still draw one rather than fail.
    """
    array = np.asarray(features, dtype=np.float64)
    if array.ndim != 2 or 0 in array.shape:
        raise ValueError(f"features must be a 2-D array (n, d) with n >= 1 and d >= 1; got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError("features must be finite; NaN or infinity was given.")
    n = array.shape[0]
    if n < 5:
        return _pca_2d(array)
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    perplexity = min(30.0, max(2.0, (n - 1) / 3))
    tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity)
    # Small sets have nothing worth parallelising, and OpenMP threads spin-waiting on a busy machine made 40 points
    # take 15 s instead of 0.1 s. The embedding is the same either way; only the time differs.
    with threadpool_limits(limits=1 if n < SINGLE_THREAD_TSNE_BELOW else None):
        embedding = tsne.fit_transform(array)
    return np.asarray(embedding, dtype=np.float64)


def plot_embedding(points: np.ndarray, labels: ArrayLike, path: Path, title: str) -> None:
    """Real and fake images as two colours in a 2-D embedding (the paper's Fig. 9)."""
    array = np.asarray(points, dtype=np.float64)
    label_array = np.asarray(labels).ravel()
    if array.ndim != 2 or array.shape[1] != 2 or array.shape[0] != label_array.size:
        raise ValueError(
            f"points must have shape (n, 2) with one label (0 real, 1 fake) per point; "
            f"got points {array.shape} and {label_array.size} labels."
        )
    figure = _new_figure(5, 5)
    axes = figure.add_subplot()
    for value, name, color in ((0, "real", REAL_COLOR), (1, "fake", FAKE_COLOR)):
        chosen = array[label_array == value]
        axes.scatter(chosen[:, 0], chosen[:, 1], s=10, alpha=0.7, color=color, label=name, linewidths=0)
    axes.set(title=title, xticks=[], yticks=[])  # t-SNE axes have no units worth reading
    axes.legend(fontsize=LEGEND_FONT_SIZE + 1, markerscale=1.5)
    _save(figure, path)


def plot_confusion(matrix: ArrayLike, true_labels: Sequence[str], predicted_labels: Sequence[str], path: Path) -> None:
    """An attribution head's confusion matrix as a heatmap: true classes as rows, predicted ones as columns, and
    each cell's count written in it (the colour alone hides small counts)."""
    counts = np.asarray(matrix)
    if counts.shape != (len(true_labels), len(predicted_labels)):
        raise ValueError(
            f"matrix must have one row per true and one column per predicted label; got shape {counts.shape} for "
            f"{len(true_labels)} and {len(predicted_labels)} labels."
        )
    figure = _new_figure(1.2 + 0.8 * len(predicted_labels), 1.0 + 0.6 * len(true_labels))
    axes = figure.add_subplot()
    image = axes.imshow(counts, cmap="Blues", vmin=0, vmax=max(int(counts.max(initial=0)), 1))
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    axes.set_xticks(range(len(predicted_labels)), predicted_labels, rotation=45, ha="right")
    axes.set_yticks(range(len(true_labels)), true_labels)
    axes.set(xlabel="Predicted class", ylabel="True class", title="Attribution")
    dark = 0.6 * counts.max(initial=0)
    for (row, column), count in np.ndenumerate(counts):
        color = "white" if count > dark else "black"  # readable on either end of the colour map
        axes.text(column, row, str(count), ha="center", va="center", fontsize=8, color=color)
    _save(figure, path)


def plot_robustness(results: dict[str, Sequence[tuple[float, float]]], clean_ap: float | None, path: Path) -> None:
    """AP under each perturbation (the paper's Fig. 4): one panel per kind, levels as categories in given order.

    results maps a kind ("noise", "blur", "jpeg", or any other name) to [(level, ap), ...]. The AP on
    unperturbed images, when given, is drawn as a dashed line in every panel.
    """
    if not results:
        raise ValueError("plot_robustness needs at least one perturbation kind with [(level, ap), ...]; none given.")
    figure = _new_figure(3.2 * len(results), 3.2)
    panels = figure.subplots(1, len(results), squeeze=False, sharey=True)[0]
    all_aps = [ap for points in results.values() for _, ap in points] + ([clean_ap] if clean_ap is not None else [])
    fits_unit_range = all(0 <= ap <= 1 for ap in all_aps if np.isfinite(ap))
    for axes, (kind, points) in zip(panels, results.items(), strict=True):
        _draw_robustness_panel(axes, kind, points, clean_ap)
        if fits_unit_range:
            axes.set_ylim(0, 1.02)
    panels[0].set_ylabel("Average precision")
    _save(figure, path)


def _draw_robustness_panel(axes, kind: str, points: Sequence[tuple[float, float]], clean_ap: float | None) -> None:
    positions = np.arange(len(points))
    axes.plot(positions, [ap for _, ap in points], marker="o", color=FAKE_COLOR)
    axes.set_xticks(positions, [f"{level:g}" for level, _ in points])
    axes.set_title(_KIND_TITLES.get(kind, kind), fontsize=9)
    axes.grid(alpha=0.3)
    if clean_ap is not None and np.isfinite(clean_ap):
        axes.axhline(clean_ap, linestyle="--", color="grey", linewidth=1, label="clean")
        axes.legend(fontsize=LEGEND_FONT_SIZE, loc="lower left")
