"""`item demo | features | train | eval | calibrate`: the paper's experiments, and a platform's own.

`demo` runs the whole method offline on the tiny profile. The other four share one path: list a dataset,
extract (or reuse) its features, then train, score or calibrate on them. Model swaps for ablations are options
(`--caption-model`, `--clip-model`, `--no-grounding`) that end up in the profile name and the stage versions,
so cached features and heads never mix across them. Files that cannot be read are reported and skipped; they
never stop a run.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from worker.cli.common import (
    JsonOpt,
    ModelDirOpt,
    OfflineOpt,
    ProfileOpt,
    err,
    fail,
    model_store,
    out,
    progress,
    settings_from,
)
from worker.settings import Settings

if TYPE_CHECKING:  # imported for real inside the commands: `item --help` should not load torch
    from pipeline.core.detector import Detector
    from pipeline.core.transforms import Chain
    from pipeline.lab.features import ArtifactCache

DataArg = Annotated[
    list[Path],
    typer.Argument(
        help="Dataset folders (0_real/1_fake per generator, or real/ fake/) or CSV manifests (path,label[,group])."
    ),
]
CaptionOpt = Annotated[str | None, typer.Option("--caption-model", help="Swap the captioner (ablation).")]
ClipOpt = Annotated[str | None, typer.Option("--clip-model", help="Swap the CLIP backbone (ablation).")]
GroundingOpt = Annotated[
    bool, typer.Option("--grounding/--no-grounding", help="--no-grounding compares phrases with the whole image.")
]
ReencodeOpt = Annotated[
    str | None,
    typer.Option(
        "--reencode",
        help="Re-encode every image alike before extraction, e.g. jpeg:95 (format-bias guard); the head records "
        "it, and scan, eval, calibrate, workers and re-scores apply it wherever the head scores.",
    ),
]
CacheDirOpt = Annotated[Path | None, typer.Option("--cache-dir", help="Feature cache [env ITEM_FEATURE_DIR].")]
LedgerCacheOpt = Annotated[
    bool, typer.Option("--cache-in-ledger", help="Cache in the ledger (ITEM_DATABASE_URL), shared with the worker.")
]
HeadOpt = Annotated[Path, typer.Option("--head", help="Head .safetensors to evaluate.")]
DeviceOpt = Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N.")]
BatchOpt = Annotated[int | None, typer.Option("--batch-size", min=1, help="Images per model batch.")]

app = typer.Typer()


@app.command()
def demo(
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the images and the trained head.")] = Path(
        "item-demo"
    ),
    model_dir: ModelDirOpt = None,
    per_family: Annotated[int, typer.Option(min=2, help="Images per family.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed for images and training.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Run the whole method offline on the tiny profile: make data, train a head, score held-out images."""
    from pipeline.lab.demo import run_demo

    settings = settings_from(model_dir=model_dir)
    err.print(
        "[yellow]The tiny profile uses small random models: this demo shows the plumbing end to end, "
        "not detection quality.[/]"
    )
    with progress("extracting features") as bar:
        task = bar.add_task("features", total=2 * per_family)
        report = run_demo(
            out_dir,
            model_store(settings, offline=True),
            per_family=per_family,
            seed=seed,
            batch_size=settings.batch_size,
            progress=lambda n: bar.advance(task, n),
        )
    if as_json:
        for path, label, detection in report.test:
            print(json.dumps({"path": str(path), "label": label, **detection.to_dict()}))
    else:
        _print_demo(report)


def _print_demo(report) -> None:
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


@app.command()
def features(
    data: DataArg,
    profile: ProfileOpt = None,
    caption_model: CaptionOpt = None,
    clip_model: ClipOpt = None,
    grounding: GroundingOpt = True,
    reencode: ReencodeOpt = None,
    model_dir: ModelDirOpt = None,
    cache_dir: CacheDirOpt = None,
    cache_in_ledger: LedgerCacheOpt = False,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    offline: OfflineOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Extract and cache the features of datasets (resumable), so train and eval start at once."""
    settings = settings_from(
        profile=profile, model_dir=model_dir, feature_dir=cache_dir, batch_size=batch_size, device=device
    )
    dataset = _dataset(data)
    name = _ablation(settings.profile, caption_model, clip_model, grounding)
    run = _Run.start(settings, _detector(name, settings, offline), cache_in_ledger, _transform(reencode))
    extracted = run.extract(dataset.samples)
    summary = {"profile": name, **_extraction_summary(extracted, dataset), "groups": _group_counts(extracted)}
    _finish(summary, as_json, lambda: _print_groups(extracted, f"features · {name}"))


@app.command()
def train(
    data: DataArg,
    head_out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the head (.safetensors + .json).")],
    val: Annotated[list[Path] | None, typer.Option("--val", help="Validation dataset(s); default: a split.")] = None,
    val_fraction: Annotated[float, typer.Option(min=0, max=0.9, help="Held out per generator and class.")] = 0.1,
    profile: ProfileOpt = None,
    caption_model: CaptionOpt = None,
    clip_model: ClipOpt = None,
    grounding: GroundingOpt = True,
    representation: Annotated[
        str, typer.Option(help="both (Eq. 8), global (D_g only) or local (D_l only): the Fig. 5 ablation.")
    ] = "both",
    w1: Annotated[float | None, typer.Option(help="Weight of D_g (default 1; 0 with --representation local).")] = None,
    w2: Annotated[float | None, typer.Option(help="Weight of D_l (default 1; 0 with --representation global).")] = None,
    epochs: Annotated[int, typer.Option(min=1)] = 50,
    lr: Annotated[float, typer.Option(min=0)] = 1e-3,
    weight_decay: Annotated[float, typer.Option(min=0)] = 1e-3,
    train_batch_size: Annotated[int, typer.Option(min=1, help="Feature vectors per optimiser step.")] = 64,
    hidden: Annotated[int, typer.Option(min=1, help="Hidden width of the MLP head.")] = 256,
    seed: Annotated[int, typer.Option(help="Seed of the split and the training: same data + seed, same head.")] = 0,
    attribute: Annotated[
        bool,
        typer.Option("--attribute", help="One output per generator folder besides real: eval names the generator."),
    ] = False,
    reencode: ReencodeOpt = None,
    model_dir: ModelDirOpt = None,
    cache_dir: CacheDirOpt = None,
    cache_in_ledger: LedgerCacheOpt = False,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    offline: OfflineOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the MLP head on cached features, the paper's way by default (AdamW, 50 epochs, lr/wd 1e-3)."""
    from pipeline.core.detector import RULE_VERSIONS
    from pipeline.core.head import HeadMetadata
    from pipeline.lab.datasets import split
    from pipeline.lab.training import TrainConfig, attribution_groups

    settings = settings_from(
        profile=profile, model_dir=model_dir, feature_dir=cache_dir, batch_size=batch_size, device=device
    )
    weights = _weights(representation, w1, w2)
    name = _ablation(settings.profile, caption_model, clip_model, grounding)
    dataset = _dataset(data)
    run = _Run.start(settings, _detector(name, settings, offline), cache_in_ledger, _transform(reencode))
    extracted = run.extract(dataset.samples)
    if val:
        train_set, val_set = extracted, run.extract(_dataset(val).samples)
    else:
        train_set, val_set = _split(extracted, split, val_fraction, seed)
    _need_both_classes(train_set)
    groups = attribution_groups(extracted.samples) if attribute else None
    if groups:
        _need_attribution_classes(train_set, groups)
    config = TrainConfig(epochs, lr, weight_decay, train_batch_size, hidden, seed)
    dim = int(train_set.global_.shape[1])
    metadata = HeadMetadata(
        name, run.detector.stage_versions, dim, w1=weights[0], w2=weights[1], input_transform=run.transform.id,
        rules=dict(RULE_VERSIONS), groups=groups,
    )  # fmt: skip
    head = _fit(train_set, val_set, metadata, config)
    head.metadata.training.update(
        datasets=[str(path) for path in data],
        validation_source=[str(path) for path in val] if val else f"split {val_fraction:g} (seed {seed})",
        representation=representation,
        features=_extraction_summary(extracted, dataset),
    )
    weights_path = head.save(head_out)
    summary = {"head": str(weights_path), "version": head.version, "profile": name, **head.metadata.training}
    summary["input_transform"] = head.metadata.input_transform
    if groups:
        summary["groups"] = groups
    _finish(summary, as_json, lambda: _print_training(head, weights_path, train_set, val_set))


@app.command("eval")
def evaluate(
    data: DataArg,
    head_path: HeadOpt,
    out_dir: Annotated[Path, typer.Option("--out", "-o", help="Folder for tables, scores and plots.")] = Path(
        "item-eval"
    ),
    perturb: Annotated[bool, typer.Option("--perturb", help="Also score the paper's perturbations (Fig. 4).")] = False,
    perturbations: Annotated[str, typer.Option(help="Which ones, comma-separated.")] = "noise,blur,jpeg",
    plots: Annotated[bool, typer.Option("--plots/--no-plots", help="PR/ROC curves and t-SNE as PNG.")] = True,
    tsne_max: Annotated[int, typer.Option(min=10, help="At most this many images in the t-SNE plot.")] = 2000,
    reencode: ReencodeOpt = None,
    model_dir: ModelDirOpt = None,
    cache_dir: CacheDirOpt = None,
    cache_in_ledger: LedgerCacheOpt = False,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    offline: OfflineOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """ACC and AP per generator and on average (paper Tables I-III), as a table, CSV and Markdown, with plots."""
    from pipeline.lab import evaluation
    from pipeline.lab.features import effective_transform, format_bias_warning

    settings = settings_from(model_dir=model_dir, feature_dir=cache_dir, batch_size=batch_size, device=device)
    head, run = _head_run(head_path, settings, offline, cache_in_ledger, reencode)
    kinds = _kinds(perturbations) if perturb else []  # checked now, not after a long extraction
    dataset = _dataset(data)
    extracted = run.extract(dataset.samples)
    if not len(extracted.samples):
        raise fail(ValueError("No readable images to evaluate."))
    report = evaluation.evaluate(extracted, head)
    written = _write_eval(report, out_dir, head, plots, tsne_max)
    robustness = []
    if kinds:
        robustness = _robustness(run, dataset.samples, head, kinds, report)
        written.update(_write_robustness(robustness, out_dir, plots))
    warning = format_bias_warning(extracted, effective_transform(run.detector, run.transform))
    summary = {
        "head": str(head_path),
        "head_version": head.version,
        "threshold": head.metadata.threshold,
        "input_transform": effective_transform(run.detector, run.transform).id,
        "metrics": [row.to_dict() for row in report.rows()],
        "robustness": [row.to_dict() for row in robustness],
        "features": _extraction_summary(extracted, dataset),
        "format_warning": warning,
        "files": {key: str(path) for key, path in written.items()},
    }
    if report.attribution:
        summary["attribution"] = report.attribution.to_dict()
    (out_dir / "summary.json").write_text(json.dumps(_finite(summary), indent=2, default=str) + "\n")
    _finish(summary, as_json, lambda: _print_eval(report, robustness, written, warning))


@app.command()
def calibrate(
    real: Annotated[Path, typer.Argument(help="Known-real images: a folder, or the real half of a dataset.")],
    head_path: Annotated[Path, typer.Option("--head", help="Head to calibrate.")],
    target_fpr: Annotated[float, typer.Option(min=0, max=0.5, help="Share of real images it may flag.")] = 0.01,
    fakes: Annotated[
        Path | None,
        typer.Option("--fakes", help="Known-fake images for the uncertain band (default: REAL's fake half, if any)."),
    ] = None,
    target_catch: Annotated[
        float | None,
        typer.Option(
            min=0.01,
            max=1.0,
            help="Share of known fakes that must not pass as real: sets the uncertain band's "
            "lower edge (real below it, uncertain up to the threshold). Unset: one threshold.",
        ),
    ] = None,
    head_out: Annotated[Path | None, typer.Option("--out", "-o", help="Where to write it; default: in place.")] = None,
    reencode: ReencodeOpt = None,
    model_dir: ModelDirOpt = None,
    cache_dir: CacheDirOpt = None,
    cache_in_ledger: LedgerCacheOpt = False,
    batch_size: BatchOpt = None,
    device: DeviceOpt = None,
    offline: OfflineOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Set the head's threshold so at most --target-fpr of known-real images are flagged, and with --target-catch
    an uncertain band below it; store them in the head."""
    from pipeline.core.errors import ItemError
    from pipeline.lab.calibration import calibrate as calibrate_head
    from pipeline.lab.calibration import labelled_samples
    from pipeline.lab.evaluation import score

    settings = settings_from(model_dir=model_dir, feature_dir=cache_dir, batch_size=batch_size, device=device)
    try:
        samples = labelled_samples(real, 0)
        fake_samples = labelled_samples(fakes or real, 1) if target_catch is not None else []
    except ItemError as error:
        raise fail(error) from None
    head, run = _head_run(head_path, settings, offline, cache_in_ledger, reencode)
    extracted = run.extract(samples)
    if not len(extracted.samples):
        raise fail(ValueError(f"None of the {len(samples)} files under {real} could be read."))
    fake_scores = score(run.extract(fake_samples), head) if fake_samples else None
    try:
        calibrated, report = calibrate_head(head, score(extracted, head), target_fpr, fake_scores, target_catch)
    except ValueError as error:
        raise fail(error) from None
    weights_path = calibrated.save(head_out or head_path)
    summary = {"head": str(weights_path), "version": calibrated.version, **report.to_dict()}
    _finish(summary, as_json, lambda: _print_calibration(report, weights_path, calibrated.version))


# ---------------------------------------------------------------------------------------------- shared steps


def _dataset(paths: list[Path]):
    from pipeline.core.errors import ItemError
    from pipeline.lab.datasets import load_datasets

    try:
        dataset = load_datasets(paths)
    except ItemError as error:
        raise fail(error) from None
    for problem in dataset.problems[:10]:
        err.print(f"[yellow]skipped[/] {escape(problem.where)}: {escape(problem.reason)}")
    if len(dataset.problems) > 10:
        err.print(f"[yellow]skipped[/] … and {len(dataset.problems) - 10} more entries")
    return dataset


def _ablation(profile: str, caption_model: str | None, clip_model: str | None, grounding: bool) -> str:
    from pipeline.core.errors import ItemError
    from pipeline.core.profiles import get_profile, with_models

    try:
        swaps = {"caption": caption_model, "embed": clip_model, "ground": None if grounding else "off"}
        return with_models(get_profile(profile), **swaps).name
    except ItemError as error:
        raise fail(error) from None


def _detector(profile_name: str, settings, offline: bool, head=None):
    from pipeline.core.detector import Detector
    from pipeline.core.errors import ItemError
    from pipeline.core.profiles import get_profile

    try:
        store = model_store(settings, offline)
        detector = Detector(get_profile(profile_name), store, head, settings.device, settings.stage_precision)
    except (ItemError, ValueError) as error:
        raise fail(error) from None
    if detector.profile.meaningless_scores:
        err.print(
            f"[yellow]note[/] the {detector.profile.name} profile's models are random: figures show the plumbing only."
        )
    return detector


def _head(path: Path):
    from pipeline.core.errors import ItemError
    from pipeline.core.head import Head

    try:
        return Head.load(path)
    except ItemError as error:
        raise fail(error) from None


def _transform(text: str | None):
    from pipeline.core.transforms import parse_transform

    try:
        return parse_transform(text or "none")
    except ValueError as error:
        raise fail(error) from None


def _head_run(head_path: Path, settings, offline: bool, in_ledger: bool, reencode: str | None):
    """The head and an extraction run with its models and, unless told otherwise, its input transform."""
    head = _head(head_path)
    trained = head.metadata.input_transform  # applied by the detector itself, as wherever this head scores
    transform = _transform(None if reencode in (None, trained) else reencode)
    if transform.steps:
        err.print(f"[yellow]note[/] the head was trained on inputs {trained!r}; {transform.id!r} comes before it.")
    return head, _Run.start(settings, _detector(head.metadata.profile, settings, offline, head), in_ledger, transform)


@dataclass
class _Run:
    """What every extraction of one command shares: settings, models, one cache, the input transform."""

    settings: Settings
    detector: Detector
    cache: ArtifactCache
    transform: Chain

    @classmethod
    def start(cls, settings, detector, in_ledger: bool, transform) -> _Run:
        if in_ledger:
            from worker.ledger.cache import LedgerCache
            from worker.ledger.store import Ledger

            return cls(settings, detector, LedgerCache(Ledger(settings.database_url)), transform)
        from pipeline.lab.features import DiskCache

        return cls(settings, detector, DiskCache(settings.feature_dir), transform)

    def limits(self) -> dict:
        """`extract`'s batch size and input limits, from the settings."""
        return {
            "batch_size": self.settings.batch_size,
            "max_pixels": self.settings.max_pixels,
            "max_bytes": self.settings.max_image_bytes,
        }

    def extract(self, samples):
        from pipeline.core.errors import ItemError
        from pipeline.lab.features import extract

        label = f"features ({self.transform.id})" if self.transform.steps else "features"
        with progress(label) as bar:
            task = bar.add_task(label, total=len(samples))
            advance = lambda n: bar.advance(task, n)  # noqa: E731
            try:
                extracted = extract(
                    samples, self.detector, self.cache, transform=self.transform, progress=advance, **self.limits()
                )
            except ItemError as error:
                raise fail(error) from None
        _report_failures(extracted.failures, len(samples))
        return extracted


def _report_failures(failures, total: int) -> None:
    if not failures:
        return
    codes = ", ".join(f"{count} {code}" for code, count in Counter(f.code for f in failures).most_common())
    err.print(f"[yellow]{len(failures)} of {total} files could not be read and were skipped[/] ({codes})")
    for failure in failures[:5]:
        err.print(f"  {escape(str(failure.path))}: {escape(failure.message)}")


def _extraction_summary(extracted, dataset) -> dict:
    return {
        "images": len(extracted.samples),
        "computed": extracted.computed,
        "reused": extracted.reused,
        "unreadable": len(extracted.failures),
        "unreadable_by_code": dict(Counter(f.code for f in extracted.failures)),
        "skipped_entries": len(dataset.problems),
    }


def _group_counts(extracted) -> dict[str, dict[str, int]]:
    counts: dict[str, dict[str, int]] = {}
    for sample in extracted.samples:
        row = counts.setdefault(sample.group, {"real": 0, "fake": 0})
        row["fake" if sample.label else "real"] += 1
    return counts


def _split(extracted, split, val_fraction: float, seed: int):
    train_samples, val_samples = split(extracted.samples, val_fraction, seed)
    position = {id(sample): index for index, sample in enumerate(extracted.samples)}
    rows = [position[id(sample)] for sample in train_samples], [position[id(sample)] for sample in val_samples]
    return extracted.subset(rows[0]), extracted.subset(rows[1])


def _need_both_classes(train_set) -> None:
    present = set(train_set.labels.tolist())
    if present != {0, 1}:
        missing = "fake" if 0 in present else "real"
        raise fail(ValueError(f"The training data has no readable {missing} images; a head needs both classes."))


def _need_attribution_classes(train_set, groups: list[str]) -> None:
    """An attribution head needs two generators to tell apart, and a training image of every class it names."""
    from pipeline.core.head import REAL_GROUP
    from pipeline.lab.training import class_indices

    generators = groups[1:]
    if len(generators) < 2:
        found = f"only {generators[0]!r}" if generators else "none"
        raise fail(
            ValueError(
                f"--attribute needs fakes from at least 2 generator folders; found {found}. "
                "Train without --attribute for real against fake."
            )
        )
    if REAL_GROUP in generators:
        raise fail(ValueError(f"A generator folder named {REAL_GROUP!r} clashes with the real class; rename it."))
    present = set(class_indices(train_set.samples, groups).tolist())
    missing = [group for index, group in enumerate(groups) if index not in present]
    if missing:
        raise fail(
            ValueError(
                f"The training data has no readable images of {', '.join(missing)}; --attribute "
                "needs every class it names."
            )
        )


def _weights(representation: str, w1: float | None, w2: float | None) -> tuple[float, float]:
    defaults = {"both": (1.0, 1.0), "global": (1.0, 0.0), "local": (0.0, 1.0)}
    if representation not in defaults:
        raise fail(ValueError(f"--representation must be one of {', '.join(defaults)}, not {representation!r}."))
    d1, d2 = defaults[representation]
    return (d1 if w1 is None else w1), (d2 if w2 is None else w2)


def _fit(train_set, val_set, metadata, config):
    from pipeline.lab.training import train_head

    w1, w2 = metadata.w1, metadata.w2
    validation = (val_set.representation(w1, w2), _targets(val_set, metadata)) if len(val_set.samples) else None
    with progress("training") as bar:
        task = bar.add_task("training", total=config.epochs)

        def show(epoch) -> None:
            text = f"loss {epoch.train_loss:.4f}"
            if epoch.val_accuracy is not None:
                text += f" · val acc {epoch.val_accuracy:.1%} AP {epoch.val_ap:.3f}"
            if epoch.val_attribution_accuracy is not None:
                text += f" · attribution {epoch.val_attribution_accuracy:.1%}"
            bar.update(task, advance=1, description=f"training · {text}")

        features = train_set.representation(w1, w2)
        return train_head(
            features, _targets(train_set, metadata), metadata, config, validation=validation, on_epoch=show
        )


def _targets(feature_set, metadata):
    """What the head learns for each image: its label, or an attribution head's class index."""
    from pipeline.lab.training import class_indices

    return class_indices(feature_set.samples, metadata.groups) if metadata.groups else feature_set.labels


def _kinds(text: str) -> list[str]:
    from pipeline.lab.evaluation import perturbation_grid

    kinds = [kind.strip() for kind in text.split(",") if kind.strip()]
    try:
        if not kinds:
            raise ValueError("--perturbations needs at least one of noise, blur, jpeg.")
        perturbation_grid(kinds)
    except ValueError as error:
        raise fail(error) from None
    return kinds


def _robustness(run: _Run, samples, head, kinds, report):
    from pipeline.lab import evaluation

    grid = evaluation.perturbation_grid(kinds)
    with progress("perturbations") as bar:
        task = bar.add_task("perturbations", total=len(samples) * len(grid))

        def on_level(kind: str, level: float):
            bar.update(task, description=f"perturbations · {kind} {level:g}")
            return lambda n: bar.advance(task, n)

        rows = evaluation.robustness(
            samples, run.detector, run.cache, head, base=run.transform, kinds=kinds, on_level=on_level, **run.limits()
        )
    from pipeline.lab.features import effective_transform

    return [evaluation.clean_row(report, effective_transform(run.detector, run.transform)), *rows]


# ---------------------------------------------------------------------------------------------- outputs


def _write_eval(report, out_dir: Path, head, plots: bool, tsne_max: int) -> dict[str, Path]:
    from pipeline.lab import evaluation

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
        written.update(_plot_eval(report, out_dir, tsne_max, head))
    if report.attribution:
        written.update(_write_confusion(report.attribution, out_dir, plots))
    return written


def _write_confusion(matrix, out_dir: Path, plots_on: bool) -> dict[str, Path]:
    from pipeline.lab import evaluation

    written = {"confusion_csv": out_dir / "confusion.csv", "confusion_md": out_dir / "confusion.md"}
    written["confusion_csv"].write_text(evaluation.confusion_csv(matrix))
    written["confusion_md"].write_text(evaluation.confusion_table(matrix))
    if plots_on:
        from pipeline.lab import plots

        written["confusion_png"] = out_dir / "confusion.png"
        plots.plot_confusion(matrix.matrix, matrix.labels, matrix.groups, written["confusion_png"])
    return written


def _plot_eval(report, out_dir: Path, tsne_max: int, head) -> dict[str, Path]:
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


def _write_robustness(rows, out_dir: Path, plots_on: bool) -> dict[str, Path]:
    from pipeline.lab import evaluation

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


def _finish(summary: dict, as_json: bool, show) -> None:
    if as_json:
        print(json.dumps(_finite(summary), default=str))
    else:
        show()


def _finite(value):
    """NaN (AP of a one-class group) as null: JSON has no NaN, and strict parsers reject it."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _print_groups(extracted, title: str) -> None:
    table = Table(title=title)
    for column in ("group", "real", "fake"):
        table.add_column(column, justify="right" if column != "group" else "left")
    for group, counts in _group_counts(extracted).items():
        table.add_row(group, str(counts["real"]), str(counts["fake"]))
    out.print(table)
    out.print(
        f"{len(extracted.samples)} images: {extracted.computed} computed, {extracted.reused} from the cache, "
        f"{len(extracted.failures)} unreadable"
    )


def _print_training(head, weights_path: Path, train_set, val_set) -> None:
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


def _print_eval(report, robustness, written: dict[str, Path], warning: str | None) -> None:
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
        out.print(_confusion_table(report.attribution))
    if warning:
        err.print(f"[yellow]format bias[/] {escape(warning)}")
    for path in written.values():
        out.print(f"wrote {path}", soft_wrap=True)


def _confusion_table(matrix) -> Table:
    from pipeline.lab.evaluation import percent

    corner = "true \\ predicted"
    table = Table(title=f"attribution · ACC % {percent(matrix.accuracy)}")
    for column in (corner, *matrix.groups, "total", "recall %"):
        table.add_column(escape(column), justify="left" if column == corner else "right")
    for row, label in enumerate(matrix.labels):
        counts = [str(count) for count in matrix.matrix[row].tolist()]
        table.add_row(escape(label), *counts, str(int(matrix.totals[row])), percent(matrix.recall(row)))
    return table


def _print_calibration(report, weights_path: Path, version: str) -> None:
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
