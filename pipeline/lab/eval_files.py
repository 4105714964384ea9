"""What `item eval` writes to its `--out` folder: the metrics as CSV and Markdown, every image's score, the
attribution confusion matrix, the robustness grid, their plots, and `summary.json`.

Each writer returns the files it wrote by key (`metrics_csv`, `pr_png`, ...), the keys of the summary's `files`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.lab import evaluation
from pipeline.lab.summaries import finite

if TYPE_CHECKING:
    from pipeline.core.head import Head
    from pipeline.lab.evaluation import Confusion, EvalReport, RobustnessRow


def write_eval(report: EvalReport, out_dir: Path, head: Head, plots: bool, tsne_max: int) -> dict[str, Path]:
    """metrics.csv, metrics.md and scores.csv; with `plots`, PR and ROC curves and a t-SNE of at most `tsne_max`
    images; for an attribution head, the confusion matrix."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {
        "metrics_csv": (out_dir / "metrics.csv", evaluation.metrics_csv(report.rows())),
        "metrics_md": (
            out_dir / "metrics.md",
            evaluation.paper_table(report) + "\n" + evaluation.long_table(report.rows()),
        ),
        "scores_csv": (out_dir / "scores.csv", evaluation.scores_csv(report)),
    }
    for path, text in files.values():
        path.write_text(text)
    written = {key: path for key, (path, _) in files.items()}
    if plots:
        written.update(plot_eval(report, out_dir, tsne_max, head))
    if report.attribution:
        written.update(write_confusion(report.attribution, out_dir, plots))
    return written


def write_confusion(matrix: Confusion, out_dir: Path, plots_on: bool) -> dict[str, Path]:
    written = {"confusion_csv": out_dir / "confusion.csv", "confusion_md": out_dir / "confusion.md"}
    written["confusion_csv"].write_text(evaluation.confusion_csv(matrix))
    written["confusion_md"].write_text(evaluation.confusion_table(matrix))
    if plots_on:
        from pipeline.lab import plots

        written["confusion_png"] = out_dir / "confusion.png"
        plots.plot_confusion(matrix.matrix, matrix.labels, matrix.groups, written["confusion_png"])
    return written


def plot_eval(report: EvalReport, out_dir: Path, tsne_max: int, head: Head) -> dict[str, Path]:
    """PR and ROC curves (all images, then each group) and the t-SNE of the representation D."""
    from pipeline.lab import plots

    labels, groups = report.labels, report.features.groups
    curves = {"all": (labels, report.scores)}
    for group in dict.fromkeys(groups):
        rows = [index for index, name in enumerate(groups) if name == group]
        curves[group] = (labels[rows], report.scores[rows])
    written = {"pr_png": out_dir / "pr.png", "roc_png": out_dir / "roc.png", "tsne_png": out_dir / "tsne.png"}
    plots.plot_curves(curves, written["pr_png"], written["roc_png"])
    rows = list(range(len(labels)))
    if len(rows) > tsne_max:
        rows = sorted(random.Random(0).sample(rows, tsne_max))  # a fixed sample: the same plot on every run
    representation = report.features.subset(rows).representation(head.metadata.w1, head.metadata.w2)
    points = plots.tsne_2d(representation.numpy(), seed=0)
    plots.plot_embedding(points, labels[rows], written["tsne_png"], "t-SNE of the misalignment representation D")
    return written


def write_robustness(rows: list[RobustnessRow], out_dir: Path, plots_on: bool) -> dict[str, Path]:
    """robustness.csv and .md; with `plots_on`, AP against the level of each perturbation (the clean row first)."""
    written = {"robustness_csv": out_dir / "robustness.csv", "robustness_md": out_dir / "robustness.md"}
    written["robustness_csv"].write_text(evaluation.robustness_csv(rows))
    written["robustness_md"].write_text(evaluation.robustness_table(rows))
    if plots_on:
        from pipeline.lab import plots

        by_kind: dict[str, list[tuple[float, float]]] = {}
        for row in rows[1:]:
            by_kind.setdefault(row.kind, []).append((row.level, row.average_precision))
        written["robustness_png"] = out_dir / "robustness.png"
        plots.plot_robustness(by_kind, rows[0].average_precision, written["robustness_png"])
    return written


def write_summary(summary: dict, out_dir: Path) -> Path:
    path = out_dir / "summary.json"
    path.write_text(json.dumps(finite(summary), indent=2, default=str) + "\n")
    return path
