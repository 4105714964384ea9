"""Labelled image sets for training and evaluation: which files, which label (0 real, 1 fake), which group.

Public detection benchmarks ship in a handful of folder conventions, and hand-made sets are easiest to describe
with a CSV. This module turns any of them into one flat, deterministic list of samples so that training and
evaluation never care where the images came from. It only lists files: opening and decoding them is left to
feature extraction, which reports unreadable files one by one instead of failing the whole run.

`split` holds out a validation set per (group, label) stratum with string-seeded shuffles, so the same seed gives
the same split on every machine and Python version, and every generator is represented on both sides.
"""

from __future__ import annotations

import csv
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import TextIO

from pipeline.core.errors import ItemError

REAL, FAKE = 0, 1
BENCHMARK_FOLDERS = {"0_real": REAL, "1_fake": FAKE}
PLAIN_FOLDERS = {"real": REAL, "fake": FAKE}  # matched case-insensitively
LABEL_WORDS = {"0": REAL, "1": FAKE, "real": REAL, "fake": FAKE}
ACCEPTED_LAYOUTS = (
    "Expected folders named 0_real and/or 1_fake somewhere below it (benchmark layout), real/ and/or fake/ folders "
    "directly inside it, or a .csv manifest with path and label columns."
)


class DatasetError(ItemError):
    """A dataset path that cannot be listed: missing, of no known layout, empty, or a malformed manifest."""

    code = "dataset.invalid"


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # 0 real, 1 fake
    group: str  # the generator (benchmark layout), or the dataset's name


@dataclass(frozen=True)
class Problem:
    where: str  # a path, or "manifest.csv:17"
    reason: str


@dataclass
class Dataset:
    root: Path
    layout: str  # "benchmark" | "folders" | "manifest" | "mixed"
    samples: list[Sample]
    problems: list[Problem]  # entries skipped while listing (bad CSV rows); never fatal

    @property
    def groups(self) -> list[str]:
        """Group names in order of first appearance."""
        return list(dict.fromkeys(sample.group for sample in self.samples))

    @property
    def labels(self) -> list[int]:
        return [sample.label for sample in self.samples]

    def counts(self) -> dict[str, tuple[int, int]]:
        """group -> (n_real, n_fake)."""
        tally = {group: [0, 0] for group in self.groups}
        for sample in self.samples:
            tally[sample.group][sample.label] += 1
        return {group: (real, fake) for group, (real, fake) in tally.items()}


def load_dataset(path: Path | str) -> Dataset:
    """Lists one dataset: a benchmark folder tree, a real/fake folder pair, or a CSV manifest."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"Dataset {path} does not exist.", code="dataset.not_found")
    if path.is_dir():
        dataset = _load_folder(path)
    elif path.suffix.lower() == ".csv":
        dataset = _load_manifest(path)
    else:
        raise DatasetError(f"{path} is not a dataset. {ACCEPTED_LAYOUTS}", code="dataset.unrecognised")
    if not dataset.samples:
        raise DatasetError(_empty_message(dataset), code="dataset.empty")
    return dataset


def load_datasets(paths: Sequence[Path | str]) -> Dataset:
    """Concatenates several datasets; the layout reads "mixed" when they differ."""
    if not paths:
        raise DatasetError("No dataset paths were given.", code="dataset.empty")
    parts = [load_dataset(path) for path in paths]
    layouts = {part.layout for part in parts}
    return Dataset(
        root=parts[0].root,
        layout=layouts.pop() if len(layouts) == 1 else "mixed",
        samples=[sample for part in parts for sample in part.samples],
        problems=[problem for part in parts for problem in part.problems],
    )


def split(samples: Sequence[Sample], val_fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic stratified (train, val) split by (group, label); both keep the original sample order."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1); got {val_fraction}.")
    strata: dict[tuple[str, int], list[int]] = {}
    for index, sample in enumerate(samples):
        strata.setdefault((sample.group, sample.label), []).append(index)
    held_out: set[int] = set()
    for (group, label), indices in strata.items():
        # A string seed is hashed the same way on every run; hash() of a tuple would not be.
        random.Random(f"{seed}:{group}:{label}").shuffle(indices)
        held_out.update(indices[: _validation_size(len(indices), val_fraction)])
    train = [sample for index, sample in enumerate(samples) if index not in held_out]
    val = [sample for index, sample in enumerate(samples) if index in held_out]
    return train, val


def _validation_size(n: int, fraction: float) -> int:
    """round(fraction·n), but at least one when there is something to spare, and never the whole stratum."""
    if fraction == 0 or n < 2:
        return 0
    return min(max(round(fraction * n), 1), n - 1)


def _load_folder(root: Path) -> Dataset:
    directories, files = _list_tree(root)
    if any(directory.name in BENCHMARK_FOLDERS for directory in directories):
        return Dataset(root, "benchmark", _benchmark_samples(root, files), [])
    if any(len(directory.parts) == 1 and directory.name.lower() in PLAIN_FOLDERS for directory in directories):
        return Dataset(root, "folders", _plain_folder_samples(root, files), [])
    raise DatasetError(f"{root} is not a dataset. {ACCEPTED_LAYOUTS}", code="dataset.unrecognised")


def _benchmark_samples(root: Path, files: list[PurePath]) -> list[Sample]:
    samples = []
    for relative in files:
        folders = relative.parts[:-1]
        # The nearest class folder decides, so a stray 0_real inside a 1_fake tree cannot relabel its files.
        positions = [i for i, name in enumerate(folders) if name in BENCHMARK_FOLDERS]
        if not positions:
            continue  # e.g. a README beside the generator folders
        position = positions[-1]
        group = folders[0] if position > 0 else _folder_name(root)
        samples.append(Sample(root / relative, BENCHMARK_FOLDERS[folders[position]], group))
    return samples


def _plain_folder_samples(root: Path, files: list[PurePath]) -> list[Sample]:
    group = _folder_name(root)
    return [
        Sample(root / relative, PLAIN_FOLDERS[relative.parts[0].lower()], group)
        for relative in files
        if len(relative.parts) > 1 and relative.parts[0].lower() in PLAIN_FOLDERS
    ]


def _folder_name(root: Path) -> str:
    # resolve() so that "." or "data/" still name the folder itself.
    return root.resolve().name


def _list_tree(root: Path) -> tuple[list[PurePath], list[PurePath]]:
    """Every non-hidden folder and regular file below root, relative to it; files sorted by path."""
    directories: list[PurePath] = []
    files: list[PurePath] = []
    for folder, subfolders, names in _walk(root):
        relative_folder = PurePath(folder).relative_to(root)
        directories.extend(relative_folder / name for name in subfolders)
        files.extend(
            relative_folder / name
            for name in names
            if not name.startswith(".") and os.path.isfile(os.path.join(folder, name))
        )
    return directories, sorted(files)


def _walk(root: Path) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk without hidden folders, following symlinked folders (datasets are often assembled from links)
    but visiting each real folder once, so a link cycle cannot loop forever."""
    seen: set[str] = set()
    for folder, subfolders, names in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        yield folder, subfolders, names


def _load_manifest(csv_path: Path) -> Dataset:
    try:
        with csv_path.open(newline="", encoding="utf-8-sig") as handle:
            samples, problems = _read_manifest(csv_path, handle)
    except (UnicodeDecodeError, csv.Error) as error:
        message = f"Manifest {csv_path} is not a readable UTF-8 CSV: {error}"
        raise DatasetError(message, code="dataset.bad_manifest") from error
    return Dataset(csv_path, "manifest", samples, problems)


def _read_manifest(csv_path: Path, handle: TextIO) -> tuple[list[Sample], list[Problem]]:
    reader = csv.reader(handle)
    header = [name.strip().lower() for name in next(reader, [])]
    missing = [column for column in ("path", "label") if column not in header]
    if missing:
        raise DatasetError(
            f"Manifest {csv_path} lacks the column(s) {', '.join(missing)}; its header has {header or 'no columns'}.",
            code="dataset.bad_manifest",
        )
    columns = {name: header.index(name) for name in ("path", "label", "group") if name in header}
    samples, problems = [], []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue  # blank lines are layout, not data
        where = f"{csv_path.name}:{reader.line_num}"
        sample = _manifest_sample(csv_path, row, columns)
        if isinstance(sample, str):
            problems.append(Problem(where, sample))
        else:
            samples.append(sample)
    return samples, problems


def _manifest_sample(csv_path: Path, row: list[str], columns: dict[str, int]) -> Sample | str:
    """The row's sample, or the reason it is skipped. A missing image file is kept: extraction reports it."""

    def cell(name: str) -> str:
        index = columns.get(name)
        return row[index].strip() if index is not None and index < len(row) else ""

    path, label = cell("path"), cell("label").lower()
    if not path:
        return "empty path"
    if label not in LABEL_WORDS:
        return f"label {label!r} is not one of 0, 1, real, fake" if label else "missing label"
    # An absolute path replaces the folder when joined; a relative one is relative to the manifest.
    return Sample(csv_path.parent / path, LABEL_WORDS[label], cell("group") or csv_path.stem)


def _empty_message(dataset: Dataset) -> str:
    message = f"Dataset {dataset.root} ({dataset.layout} layout) lists no files."
    if dataset.problems:
        first = dataset.problems[0]
        message += f" {len(dataset.problems)} row(s) were skipped; first: {first.where}: {first.reason}."
    return message
