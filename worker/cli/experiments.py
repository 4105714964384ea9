"""`item demo | features | train | eval | calibrate`: the paper's experiments, and a platform's own.

`demo` runs the whole method offline on the tiny profile. The other four share one path: list a dataset,
extract (or reuse) its features, then train, score or calibrate on them. Model swaps for ablations are options
(`--caption-model`, `--clip-model`, `--no-grounding`) that end up in the profile name and the stage versions,
so cached features and heads never mix across them. Files that cannot be read are reported and skipped; they
never stop a run.

The work is done in `pipeline.lab`; here are the options, what belongs to the service (the settings, a cache in
the ledger), progress bars and printing. train, eval and calibrate need the `lab` extra.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from pipeline.core.errors import ItemError
from pipeline.lab.extra import LabExtraMissing, require_lab_extra
from worker.cli import lab_output
from worker.cli.common import (
    JsonOpt,
    ModelDirOpt,
    OfflineOpt,
    ProfileOpt,
    err,
    fail,
    model_store,
    progress,
    settings_from,
)
from worker.settings import Settings

if TYPE_CHECKING:  # the lab is imported inside the commands: `item --help` should not load torch
    from pipeline.lab.runs import Run

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
        lab_output.print_demo(report)


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
    from pipeline.lab.runs import ablation_profile, input_transform
    from pipeline.lab.summaries import features_summary, group_counts

    settings = settings_from(
        profile=profile, model_dir=model_dir, feature_dir=cache_dir, batch_size=batch_size, device=device
    )
    dataset = _dataset(data)
    name = _checked(ablation_profile, settings.profile, caption_model, clip_model, grounding, errors=ItemError)
    run = _start(settings, _detector(name, settings, offline), cache_in_ledger, _checked(input_transform, reencode))
    extracted = _extract(run, dataset.samples)
    summary = features_summary(name, extracted, dataset)
    lab_output.finish(
        summary, as_json, lambda: lab_output.print_groups(extracted, group_counts(extracted), f"features · {name}")
    )


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
    _checked(require_lab_extra, "item train", errors=LabExtraMissing)
    from pipeline.lab import training
    from pipeline.lab.runs import ablation_profile, input_transform
    from pipeline.lab.summaries import train_summary, training_record

    settings = settings_from(
        profile=profile, model_dir=model_dir, feature_dir=cache_dir, batch_size=batch_size, device=device
    )
    weights = _checked(training.representation_weights, representation, w1, w2)
    name = _checked(ablation_profile, settings.profile, caption_model, clip_model, grounding, errors=ItemError)
    dataset = _dataset(data)
    run = _start(settings, _detector(name, settings, offline), cache_in_ledger, _checked(input_transform, reencode))
    extracted = _extract(run, dataset.samples)
    if val:
        train_set, val_set = extracted, _extract(run, _dataset(val).samples)
    else:
        train_set, val_set = training.split_features(extracted, val_fraction, seed)
    groups = training.attribution_groups(extracted.samples) if attribute else None
    _checked(training.check_classes, train_set, groups)
    config = training.TrainConfig(epochs, lr, weight_decay, train_batch_size, hidden, seed)
    metadata = training.head_metadata(name, run.detector, train_set, weights, run.transform, groups)
    head = _fit(train_set, val_set, metadata, config)
    head.metadata.training.update(training_record(data, val, val_fraction, seed, representation, extracted, dataset))
    weights_path = head.save(head_out)
    summary = train_summary(head, weights_path, name, groups)
    lab_output.finish(summary, as_json, lambda: lab_output.print_training(head, weights_path, train_set, val_set))


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
    _checked(require_lab_extra, "item eval", errors=LabExtraMissing)
    from pipeline.lab import eval_files, evaluation
    from pipeline.lab.features import format_bias_warning
    from pipeline.lab.summaries import eval_summary

    settings = settings_from(model_dir=model_dir, feature_dir=cache_dir, batch_size=batch_size, device=device)
    head, run = _head_run(head_path, settings, offline, cache_in_ledger, reencode)
    kinds = _checked(evaluation.perturbation_kinds, perturbations) if perturb else []  # now, not after extraction
    dataset = _dataset(data)
    extracted = _extract(run, dataset.samples)
    if not len(extracted.samples):
        raise fail(ValueError("No readable images to evaluate."))
    report = evaluation.evaluate(extracted, head)
    written = eval_files.write_eval(report, out_dir, head, plots, tsne_max)
    robustness = []
    if kinds:
        robustness = _robustness(run, dataset.samples, head, kinds, report)
        written.update(eval_files.write_robustness(robustness, out_dir, plots))
    warning = format_bias_warning(extracted, run.effective_transform)
    summary = eval_summary(head_path, head, run, report, robustness, extracted, dataset, warning, written)
    eval_files.write_summary(summary, out_dir)
    lab_output.finish(summary, as_json, lambda: lab_output.print_eval(report, robustness, written, warning))


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
    _checked(require_lab_extra, "item calibrate", errors=LabExtraMissing)
    from pipeline.lab.calibration import calibrate as calibrate_head
    from pipeline.lab.calibration import labelled_samples
    from pipeline.lab.evaluation import score
    from pipeline.lab.summaries import calibration_summary

    settings = settings_from(model_dir=model_dir, feature_dir=cache_dir, batch_size=batch_size, device=device)
    samples = _checked(labelled_samples, real, 0, errors=ItemError)
    fake_samples = _checked(labelled_samples, fakes or real, 1, errors=ItemError) if target_catch is not None else []
    head, run = _head_run(head_path, settings, offline, cache_in_ledger, reencode)
    extracted = _extract(run, samples)
    if not len(extracted.samples):
        raise fail(ValueError(f"None of the {len(samples)} files under {real} could be read."))
    fake_scores = score(_extract(run, fake_samples), head) if fake_samples else None
    calibrated, report = _checked(calibrate_head, head, score(extracted, head), target_fpr, fake_scores, target_catch)
    weights_path = calibrated.save(head_out or head_path)
    summary = calibration_summary(weights_path, calibrated, report)
    lab_output.finish(summary, as_json, lambda: lab_output.print_calibration(report, weights_path, calibrated.version))


# ---------------------------------------------------------------------------------------------- shared steps


def _checked(call, *args, errors: type[Exception] | tuple = ValueError):
    """call(*args); its errors of the kinds given end the command with status 2 (see `fail`)."""
    try:
        return call(*args)
    except errors as error:
        raise fail(error) from None


def _dataset(paths: list[Path]):
    from pipeline.lab.datasets import load_datasets

    dataset = _checked(load_datasets, paths, errors=ItemError)
    for problem in dataset.problems[:10]:
        err.print(f"[yellow]skipped[/] {escape(problem.where)}: {escape(problem.reason)}")
    if len(dataset.problems) > 10:
        err.print(f"[yellow]skipped[/] … and {len(dataset.problems) - 10} more entries")
    return dataset


def _detector(profile_name: str, settings: Settings, offline: bool, head=None):
    from pipeline.lab.runs import load_detector

    try:
        store = model_store(settings, offline)
        detector = load_detector(profile_name, store, settings.device, settings.stage_precision, head)
    except (ItemError, ValueError) as error:
        raise fail(error) from None
    if detector.profile.meaningless_scores:
        err.print(
            f"[yellow]note[/] the {detector.profile.name} profile's models are random: figures show the plumbing only."
        )
    return detector


def _head_run(head_path: Path, settings: Settings, offline: bool, in_ledger: bool, reencode: str | None):
    """The head and an extraction run with its models and, unless told otherwise, its input transform."""
    from pipeline.core.head import Head
    from pipeline.lab.runs import transform_before_head

    head = _checked(Head.load, head_path, errors=ItemError)
    transform = _checked(transform_before_head, head, reencode)
    if transform.steps:
        trained = head.metadata.input_transform  # applied by the detector itself, as wherever this head scores
        err.print(f"[yellow]note[/] the head was trained on inputs {trained!r}; {transform.id!r} comes before it.")
    return head, _start(settings, _detector(head.metadata.profile, settings, offline, head), in_ledger, transform)


def _start(settings: Settings, detector, in_ledger: bool, transform) -> Run:
    """The run of one command: its models, one cache (a folder, or the ledger), the input transform and limits."""
    from pipeline.lab.runs import Run

    if in_ledger:
        from worker.ledger.cache import LedgerCache
        from worker.ledger.store import Ledger

        cache = LedgerCache(Ledger(settings.database_url))
    else:
        from pipeline.lab.features import DiskCache

        cache = DiskCache(settings.feature_dir)
    return Run(detector, cache, transform, settings.batch_size, settings.max_pixels, settings.max_image_bytes)


def _extract(run: Run, samples):
    label = f"features ({run.transform.id})" if run.transform.steps else "features"
    with progress(label) as bar:
        task = bar.add_task(label, total=len(samples))
        extracted = _checked(run.extract, samples, lambda n: bar.advance(task, n), errors=ItemError)
    lab_output.report_failures(extracted.failures, len(samples))
    return extracted


def _fit(train_set, val_set, metadata, config):
    from pipeline.lab.training import fit

    with progress("training") as bar:
        task = bar.add_task("training", total=config.epochs)

        def show(epoch) -> None:
            text = f"loss {epoch.train_loss:.4f}"
            if epoch.val_accuracy is not None:
                text += f" · val acc {epoch.val_accuracy:.1%} AP {epoch.val_ap:.3f}"
            if epoch.val_attribution_accuracy is not None:
                text += f" · attribution {epoch.val_attribution_accuracy:.1%}"
            bar.update(task, advance=1, description=f"training · {text}")

        return fit(train_set, val_set, metadata, config, on_epoch=show)


def _robustness(run: Run, samples, head, kinds, report):
    from pipeline.lab.evaluation import perturbation_grid

    with progress("perturbations") as bar:
        task = bar.add_task("perturbations", total=len(samples) * len(perturbation_grid(kinds)))

        def on_level(kind: str, level: float):
            bar.update(task, description=f"perturbations · {kind} {level:g}")
            return lambda n: bar.advance(task, n)

        return run.robustness(samples, head, kinds, report, on_level)


# ---------------------------------------------------------------------------------------------- printing
