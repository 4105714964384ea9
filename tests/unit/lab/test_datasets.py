"""Datasets: the three layouts list the right files with the right labels and groups, and split is stratified."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pipeline.core.errors import ItemError
from pipeline.lab.datasets import DatasetError, Problem, Sample, load_dataset, load_datasets, split


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG")  # never opened: the module only lists files
    return path


def make_benchmark(root: Path) -> dict[Path, tuple[int, str]]:
    """A CNNDetection-like tree with noise around it; returns the files that should be listed."""
    expected = {}
    for group, classes, n_real, n_fake in [("progan", ["airplane", "car"], 2, 3), ("biggan", [None], 1, 4)]:
        for cls in classes:
            base = root / group if cls is None else root / group / cls
            for i in range(n_real):
                expected[touch(base / "0_real" / f"r{i}.png")] = (0, group)
            for i in range(n_fake):
                expected[touch(base / "1_fake" / f"f{i}.jpg")] = (1, group)
    touch(root / "README.md")  # beside the generators, under no class folder
    touch(root / "progan" / "airplane" / "0_real" / ".DS_Store")
    touch(root / "progan" / ".cache" / "0_real" / "hidden.png")
    touch(root / ".trash" / "1_fake" / "gone.png")
    return expected


# benchmark layout


def test_benchmark_lists_nested_class_folders_with_generator_groups(tmp_path):
    expected = make_benchmark(tmp_path / "bench")
    dataset = load_dataset(tmp_path / "bench")
    assert dataset.layout == "benchmark"
    assert dataset.root == tmp_path / "bench"
    assert {sample.path: (sample.label, sample.group) for sample in dataset.samples} == expected
    assert dataset.problems == []


def test_benchmark_counts_groups_and_labels(tmp_path):
    make_benchmark(tmp_path / "bench")
    dataset = load_dataset(tmp_path / "bench")
    # progan: two classes × (2 real, 3 fake); biggan: flat, 1 real and 4 fake.
    assert dataset.counts() == {"biggan": (1, 4), "progan": (4, 6)}
    assert dataset.groups == ["biggan", "progan"]  # order of first appearance, and samples are sorted by path
    assert dataset.labels == [sample.label for sample in dataset.samples]
    assert sum(dataset.labels) == 10


def test_benchmark_order_is_sorted_by_path(tmp_path):
    make_benchmark(tmp_path / "bench")
    paths = [sample.path for sample in load_dataset(tmp_path / "bench").samples]
    assert paths == sorted(paths)


def test_benchmark_at_root_uses_root_name_and_recurses(tmp_path):
    root = tmp_path / "midjourney"
    real = [touch(root / "0_real" / "a.png"), touch(root / "0_real" / "sub" / "deeper" / "b.png")]
    fake = [touch(root / "1_fake" / "c.png")]
    touch(root / "1_fake" / ".hidden.png")
    dataset = load_dataset(str(root))  # a string path works too
    assert sorted(s.path for s in dataset.samples if s.label == 0) == sorted(real)
    assert [s.path for s in dataset.samples if s.label == 1] == fake
    assert dataset.groups == ["midjourney"]
    assert dataset.counts() == {"midjourney": (2, 1)}


def test_benchmark_with_only_fake_folder_is_still_recognised(tmp_path):
    touch(tmp_path / "gen" / "sd" / "1_fake" / "x.png")
    dataset = load_dataset(tmp_path / "gen")
    assert dataset.layout == "benchmark" and dataset.counts() == {"sd": (0, 1)}


def test_benchmark_nearest_class_folder_decides_the_label(tmp_path):
    inner = touch(tmp_path / "set" / "gen" / "1_fake" / "0_real" / "x.png")
    outer = touch(tmp_path / "set" / "gen" / "1_fake" / "y.png")
    labels = {s.path: s.label for s in load_dataset(tmp_path / "set").samples}
    assert labels == {inner: 0, outer: 1}


def test_benchmark_follows_symlinked_folders_without_looping(tmp_path):
    storage = tmp_path / "storage" / "sd"
    image = touch(storage / "1_fake" / "x.png")
    (storage / "1_fake" / "loop").symlink_to(storage, target_is_directory=True)  # a cycle back up
    (tmp_path / "set").mkdir()
    (tmp_path / "set" / "sd").symlink_to(storage, target_is_directory=True)
    dataset = load_dataset(tmp_path / "set")
    assert [s.path for s in dataset.samples] == [tmp_path / "set" / "sd" / image.relative_to(storage)]
    assert dataset.counts() == {"sd": (0, 1)}


# folders layout


def test_folders_layout_matches_names_case_insensitively(tmp_path):
    root = tmp_path / "myset"
    real = touch(root / "Real" / "a.png")
    fakes = [touch(root / "FAKE" / "b.png"), touch(root / "FAKE" / "nested" / "c.webp")]
    touch(root / "FAKE" / ".thumbs" / "d.png")
    touch(root / "notes.txt")  # in the root, not below real/ or fake/
    touch(root / "other" / "e.png")
    dataset = load_dataset(root)
    assert dataset.layout == "folders"
    assert {s.path: s.label for s in dataset.samples} == {real: 0, fakes[0]: 1, fakes[1]: 1}
    assert dataset.groups == ["myset"]
    assert dataset.counts() == {"myset": (1, 2)}


def test_folders_layout_with_only_real(tmp_path):
    touch(tmp_path / "photos" / "real" / "a.png")
    assert load_dataset(tmp_path / "photos").counts() == {"photos": (1, 0)}


# manifest layout


def write_manifest(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_manifest_resolves_paths_and_accepts_label_words(tmp_path):
    absolute = touch(tmp_path / "elsewhere" / "abs.png")
    csv_path = write_manifest(
        tmp_path / "sets" / "mine.csv",
        [
            " Path , LABEL ,Group ",
            "imgs/a.png,0,cam",
            f"{absolute},FAKE,",
            "imgs/b.png, Real ,cam",
            "imgs/missing.png,1,sd",  # no such file: kept, extraction will say so
        ],
    )
    dataset = load_dataset(csv_path)
    assert dataset.layout == "manifest"
    assert dataset.root == csv_path
    assert dataset.samples == [
        Sample(tmp_path / "sets" / "imgs" / "a.png", 0, "cam"),
        Sample(absolute, 1, "mine"),  # empty group cell → the manifest's stem
        Sample(tmp_path / "sets" / "imgs" / "b.png", 0, "cam"),
        Sample(tmp_path / "sets" / "imgs" / "missing.png", 1, "sd"),
    ]
    assert dataset.problems == []


def test_manifest_without_group_column_uses_stem(tmp_path):
    csv_path = write_manifest(tmp_path / "holdout.csv", ["label,path", "real,x.png", "1,y.png"])
    dataset = load_dataset(csv_path)
    assert dataset.counts() == {"holdout": (1, 1)}
    assert [s.path for s in dataset.samples] == [tmp_path / "x.png", tmp_path / "y.png"]


def test_manifest_bad_rows_become_problems_with_line_numbers(tmp_path):
    csv_path = write_manifest(
        tmp_path / "m.csv",
        [
            "path,label",  # line 1
            "good1.png,0",  # 2
            "bad_label.png,maybe",  # 3
            ",1",  # 4: empty path
            "",  # 5: blank, ignored
            "no_label.png",  # 6: short row
            "good2.png,fake",  # 7
            "no_label2.png,",  # 8
        ],
    )
    dataset = load_dataset(csv_path)
    assert [s.path.name for s in dataset.samples] == ["good1.png", "good2.png"]
    assert [problem.where for problem in dataset.problems] == ["m.csv:3", "m.csv:4", "m.csv:6", "m.csv:8"]
    assert "maybe" in dataset.problems[0].reason
    assert all(isinstance(problem, Problem) and problem.reason for problem in dataset.problems)


def test_manifest_missing_columns_names_the_columns_found(tmp_path):
    csv_path = write_manifest(tmp_path / "m.csv", ["file,class", "a.png,0"])
    with pytest.raises(DatasetError) as raised:
        load_dataset(csv_path)
    assert raised.value.code == "dataset.bad_manifest"
    assert "file" in raised.value.message and "class" in raised.value.message


def test_empty_manifest_file_is_a_bad_manifest(tmp_path):
    (tmp_path / "m.csv").write_text("")
    with pytest.raises(DatasetError) as raised:
        load_dataset(tmp_path / "m.csv")
    assert raised.value.code == "dataset.bad_manifest"


def test_manifest_with_only_bad_rows_is_empty(tmp_path):
    csv_path = write_manifest(tmp_path / "m.csv", ["path,label", "a.png,2"])
    with pytest.raises(DatasetError) as raised:
        load_dataset(csv_path)
    assert raised.value.code == "dataset.empty"
    assert "m.csv:2" in raised.value.message


# errors


def test_dataset_error_is_an_item_error_with_a_default_code():
    error = DatasetError("nope")
    assert isinstance(error, ItemError)
    assert error.code == "dataset.invalid" and error.permanent
    assert DatasetError("nope", code="dataset.empty").to_dict() == {"code": "dataset.empty", "message": "nope"}


def test_missing_path_is_not_found(tmp_path):
    with pytest.raises(DatasetError) as raised:
        load_dataset(tmp_path / "nowhere")
    assert raised.value.code == "dataset.not_found"


@pytest.mark.parametrize("make", [lambda root: touch(root / "imgs" / "a.png"), lambda root: touch(root / "a.txt")])
def test_unknown_layout_is_unrecognised_and_explains_the_layouts(tmp_path, make):
    target = make(tmp_path / "set")
    with pytest.raises(DatasetError) as raised:
        load_dataset(tmp_path / "set" if target.suffix == ".png" else target)
    assert raised.value.code == "dataset.unrecognised"
    for layout_hint in ("0_real", "1_fake", "real/", "fake/", ".csv"):
        assert layout_hint in raised.value.message


def test_hidden_layout_folders_do_not_count(tmp_path):
    touch(tmp_path / "set" / ".old" / "0_real" / "a.png")
    with pytest.raises(DatasetError) as raised:
        load_dataset(tmp_path / "set")
    assert raised.value.code == "dataset.unrecognised"


@pytest.mark.parametrize("folder", ["0_real", "fake"])
def test_layout_without_files_is_empty(tmp_path, folder):
    (tmp_path / "set" / folder).mkdir(parents=True)
    touch(tmp_path / "set" / folder / ".DS_Store")
    with pytest.raises(DatasetError) as raised:
        load_dataset(tmp_path / "set")
    assert raised.value.code == "dataset.empty"


# load_datasets


def test_load_datasets_concatenates_in_order(tmp_path):
    touch(tmp_path / "a" / "0_real" / "x.png")
    touch(tmp_path / "b" / "fake" / "y.png")
    csv_path = write_manifest(tmp_path / "c.csv", ["path,label", "z.png,1", "bad.png,?"])
    parts = [load_dataset(tmp_path / "a"), load_dataset(tmp_path / "b"), load_dataset(csv_path)]
    combined = load_datasets([tmp_path / "a", tmp_path / "b", csv_path])
    assert combined.root == tmp_path / "a"
    assert combined.layout == "mixed"
    assert combined.samples == [sample for part in parts for sample in part.samples]
    assert combined.problems == parts[2].problems and len(combined.problems) == 1
    assert combined.counts() == {"a": (1, 0), "b": (0, 1), "c": (0, 1)}


def test_load_datasets_keeps_a_shared_layout(tmp_path):
    touch(tmp_path / "a" / "real" / "x.png")
    touch(tmp_path / "b" / "fake" / "y.png")
    combined = load_datasets([tmp_path / "a", str(tmp_path / "b")])
    assert combined.layout == "folders" and combined.groups == ["a", "b"]


def test_load_datasets_fails_on_any_bad_path(tmp_path):
    touch(tmp_path / "a" / "real" / "x.png")
    with pytest.raises(DatasetError) as raised:
        load_datasets([tmp_path / "a", tmp_path / "missing"])
    assert raised.value.code == "dataset.not_found"


# split


def make_samples(sizes: dict[tuple[str, int], int]) -> list[Sample]:
    """Strata interleaved so that 'original order' differs from grouping by stratum."""
    samples = []
    for i in range(max(sizes.values())):
        for (group, label), n in sizes.items():
            if i < n:
                samples.append(Sample(Path(f"/{group}/{label}/{i}.png"), label, group))
    return samples


SIZES = {("progan", 0): 20, ("progan", 1): 20, ("sd", 0): 10, ("sd", 1): 7}
SAMPLES = make_samples(SIZES)


def test_split_is_a_partition_in_original_order():
    train, val = split(SAMPLES, 0.25, seed=0)
    assert not set(train) & set(val)
    assert sorted(train + val, key=SAMPLES.index) == SAMPLES
    assert train == [s for s in SAMPLES if s in set(train)]
    assert val == [s for s in SAMPLES if s in set(val)]


def test_split_is_stratified_by_group_and_label():
    _, val = split(SAMPLES, 0.25, seed=0)
    held = {stratum: sum((s.group, s.label) == stratum for s in val) for stratum in SIZES}
    assert held == {stratum: round(0.25 * n) for stratum, n in SIZES.items()}


def test_split_is_deterministic_per_seed_and_varies_across_seeds():
    assert split(SAMPLES, 0.3, seed=7) == split(list(SAMPLES), 0.3, seed=7)
    assert split(SAMPLES, 0.3, seed=7)[1] != split(SAMPLES, 0.3, seed=8)[1]


def test_split_shuffles_each_stratum_with_a_string_seed():
    """The documented seed, `"{seed}:{group}:{label}"`, is what makes splits stable across runs and machines."""
    _, val = split(SAMPLES, 0.25, seed=5)
    for (group, label), n in SIZES.items():
        stratum = [s for s in SAMPLES if (s.group, s.label) == (group, label)]
        random.Random(f"5:{group}:{label}").shuffle(stratum)
        chosen = set(stratum[: round(0.25 * n)])
        assert [s for s in val if (s.group, s.label) == (group, label)] == [s for s in SAMPLES if s in chosen]


def test_split_of_a_stratum_does_not_depend_on_other_strata():
    _, val = split(SAMPLES, 0.3, seed=1)
    _, val_progan_only = split([s for s in SAMPLES if s.group == "progan"], 0.3, seed=1)
    assert [s for s in val if s.group == "progan"] == val_progan_only


def test_split_small_strata_keep_one_for_training_and_give_one_to_validation():
    samples = make_samples({("tiny", 0): 1, ("pair", 0): 2, ("pair", 1): 3})
    train, val = split(samples, 0.01, seed=0)  # round(0.01·n) would be 0 everywhere
    assert {(s.group, s.label) for s in val} == {("pair", 0), ("pair", 1)} and len(val) == 2
    assert [s.group for s in train].count("tiny") == 1
    train, val = split(samples, 0.99, seed=0)  # round(0.99·n) would be all of them
    assert {(s.group, s.label) for s in train} == {("tiny", 0), ("pair", 0), ("pair", 1)}
    assert len(train) == 3 and len(val) == 3


def test_split_fraction_zero_keeps_everything_for_training():
    assert split(SAMPLES, 0, seed=0) == (SAMPLES, [])


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_split_rejects_fractions_outside_zero_to_one(fraction):
    with pytest.raises(ValueError):
        split(SAMPLES, fraction, seed=0)
