"""What `item demo | features | train | eval | calibrate` print: tables, summaries, warnings, or one JSON line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from worker.cli.common import err, out


def print_demo(report) -> None:
    table = Table(title="held-out images")
    for column in ("file", "truth", "verdict", "p(fake)", "caption"):
        table.add_column(column, overflow="fold")
    for path, label, d in report.test:
        table.add_row(path.name, ("real", "fake")[label], d.verdict, f"{d.p_fake:.3f}", d.caption)
    out.print(table)
    correct = round(report.accuracy * len(report.test))
    out.print(
        f"accuracy on {len(report.test)} held-out images: {report.accuracy:.1%} ({correct} correct); "
        f"head trained on {report.n_train} images"
    )
    out.print(f"head written to {report.head_path}", soft_wrap=True)
    out.print(f"next: item scan --profile tiny --head {report.head_path} {report.image_dir}", soft_wrap=True)


def report_failures(failures, total: int) -> None:
    if not failures:
        return
    codes = ", ".join(f"{count} {code}" for code, count in Counter(f.code for f in failures).most_common())
    err.print(f"[yellow]{len(failures)} of {total} files could not be read and were skipped[/] ({codes})")
    for failure in failures[:5]:
        err.print(f"  {escape(str(failure.path))}: {escape(failure.message)}")


def finish(summary: dict, as_json: bool, show) -> None:
    from pipeline.lab.summaries import finite

    if as_json:
        print(json.dumps(finite(summary), default=str))
    else:
        show()


def print_groups(extracted, counts: dict[str, dict[str, int]], title: str) -> None:
    table = Table(title=title)
    for column in ("group", "real", "fake"):
        table.add_column(column, justify="right" if column != "group" else "left")
    for group, row in counts.items():
        table.add_row(group, str(row["real"]), str(row["fake"]))
    out.print(table)
    out.print(
        f"{len(extracted.samples)} images: {extracted.computed} computed, {extracted.reused} from the cache, "
        f"{len(extracted.failures)} unreadable"
    )


def print_training(head, weights_path: Path, train_set, val_set) -> None:
    summary = head.metadata.training
    out.print(
        f"trained on {len(train_set.samples)} images ({int(train_set.labels.sum())} fake) for "
        f"{summary['epochs']} epochs: final loss {summary['final_loss']:.4f}, "
        f"train accuracy {summary['train_accuracy']:.1%}"
    )
    if head.attributes:
        classes = ", ".join(f"{group} ({count})" for group, count in summary["classes"].items())
        out.print(f"groups (training images): {escape(classes)}")
    if "validation" in summary:
        val = summary["validation"]
        out.print(
            f"validation ({len(val_set.samples)} images): accuracy {val['accuracy']:.1%}, "
            f"AP {val['average_precision']:.4f}, loss {val['loss']:.4f}"
        )
        if "attribution_accuracy" in val:
            out.print(f"validation attribution: {val['attribution_accuracy']:.1%} of fakes put down to their generator")
    out.print(f"head written to {weights_path} ({head.version})", soft_wrap=True)


def print_eval(report, robustness, written: dict[str, Path], warning: str | None) -> None:
    from pipeline.lab.evaluation import percent

    table = Table(title=f"ITEM evaluation · threshold {report.threshold:g}")
    for column in ("group", "images", "real", "fake", "ACC %", "AP %", "real ACC %", "fake ACC %"):
        table.add_column(column, justify="left" if column == "group" else "right")
    for row in report.rows():
        figures = (row.accuracy, row.average_precision, row.real_accuracy, row.fake_accuracy)
        table.add_row(row.group, str(row.n), str(row.n_real), str(row.n_fake), *map(percent, figures))
    out.print(table)
    if robustness:
        rtable = Table(title="robustness (paper Fig. 4)")
        for column in ("perturbation", "level", "images", "ACC %", "AP %"):
            rtable.add_column(column, justify="left" if column == "perturbation" else "right")
        for row in robustness:
            level = "" if row.level is None else f"{row.level:g}"
            rtable.add_row(row.kind, level, str(row.n), percent(row.accuracy), percent(row.average_precision))
        out.print(rtable)
    if report.attribution:
        out.print(confusion_table(report.attribution))
    if warning:
        err.print(f"[yellow]format bias[/] {escape(warning)}")
    for path in written.values():
        out.print(f"wrote {path}", soft_wrap=True)


def confusion_table(matrix) -> Table:
    from pipeline.lab.evaluation import percent

    corner = "true \\ predicted"
    table = Table(title=f"attribution · ACC % {percent(matrix.accuracy)}")
    for column in (corner, *matrix.groups, "total", "recall %"):
        table.add_column(escape(column), justify="left" if column == corner else "right")
    for row, label in enumerate(matrix.labels):
        counts = [str(count) for count in matrix.matrix[row].tolist()]
        table.add_row(escape(label), *counts, str(int(matrix.totals[row])), percent(matrix.recall(row)))
    return table


def print_calibration(report, weights_path: Path, version: str) -> None:
    out.print(
        f"threshold {report.previous_threshold:g} → {report.threshold:.6g}: flags {report.false_positives} of "
        f"{report.n_real} real images ({report.fpr:.2%}; target {report.target_fpr:.2%}; "
        f"95% upper bound {report.fpr_upper_95:.2%})"
    )
    if report.threshold_low is not None:
        out.print(
            f"uncertain band [{report.threshold_low:.6g}, {report.threshold:.6g}): {report.fakes_caught:.2%} of "
            f"{report.n_fake} fakes not called real (target {report.target_catch:.0%}), {report.fakes_flagged:.2%} "
            f"called fake; in the band: {report.real_in_band:.2%} of reals, {report.fake_in_band:.2%} of fakes"
        )
    for warning in report.warnings:
        err.print(f"[yellow]warning[/] {escape(warning)}")
    out.print(f"head written to {weights_path} ({version})", soft_wrap=True)
