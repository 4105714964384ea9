"""Dataset features: the on-disk cache, reuse across runs and model swaps, transforms, and unreadable files."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from pipeline.core.detector import Detector
from pipeline.core.profiles import get_profile
from pipeline.core.results import Artifacts, Features, GroundedObject
from pipeline.core.transforms import parse_transform
from pipeline.lab.datasets import Sample
from pipeline.lab.features import DiskCache, cache_versions, extract, format_bias_warning
from tests.conftest import encode, noise_image


@pytest.fixture
def samples(tmp_path) -> list[Sample]:
    """Six readable images (two identical files among them) and three unreadable files."""
    folder = tmp_path / "images"
    folder.mkdir()
    items = []
    for index in range(5):
        path = folder / f"{index}.png"
        path.write_bytes(encode(noise_image(index, 80 + 8 * index, 64)))
        items.append(Sample(path, index % 2, "g"))
    (folder / "copy.png").write_bytes((folder / "0.png").read_bytes())
    (folder / "notes.txt").write_text("not an image")
    (folder / "cut.png").write_bytes(encode(noise_image(9))[:300])
    items += [Sample(folder / name, 1, "g") for name in ("copy.png", "notes.txt", "cut.png", "missing.png")]
    return items


class StageCalls:
    """Counts the images each model stage is asked to process."""

    def __init__(self, detector: Detector, monkeypatch):
        self.counts = Counter()
        for stage, method in (
            (detector.captioner, "caption"),
            (detector.grounder, "ground"),
            (detector.embedder, "embed_images"),
        ):
            monkeypatch.setattr(stage, method, self._counting(getattr(stage, method), method))

    def _counting(self, function, name):
        def counted(items, *args):
            self.counts[name] += len(items)
            return function(items, *args)

        return counted


def test_second_run_reads_everything_from_the_cache_and_calls_no_model(tiny_detector, samples, tmp_path, monkeypatch):
    first = extract(samples, tiny_detector, DiskCache(tmp_path / "cache"), batch_size=4)
    calls = StageCalls(tiny_detector, monkeypatch)
    second = extract(samples, tiny_detector, DiskCache(tmp_path / "cache"), batch_size=4)  # a new process, in effect
    assert sum(calls.counts.values()) == 0
    assert (second.computed, second.reused) == (0, 6)
    assert torch.equal(first.global_, second.global_) and torch.equal(first.local, second.local)
    assert first.sha256s == second.sha256s and torch.equal(first.n_objects, second.n_objects)


def test_unreadable_files_are_reported_with_codes_and_never_fatal(tiny_detector, samples, tmp_path):
    result = extract(samples, tiny_detector, DiskCache(tmp_path / "cache"), batch_size=4)
    assert len(result.samples) == 6 and result.global_.shape == (6, tiny_detector.embedder.dim)
    codes = {failure.path.name: failure.code for failure in result.failures}
    assert codes == {
        "notes.txt": "image.unsupported_format",
        "cut.png": "image.truncated",
        "missing.png": "file.not_found",
    }
    assert result.formats == ["PNG"] * 6


def test_identical_files_are_analysed_once(tiny_detector, samples, tmp_path, monkeypatch):
    calls = StageCalls(tiny_detector, monkeypatch)
    result = extract(samples, tiny_detector, DiskCache(tmp_path / "cache"), batch_size=16)
    assert calls.counts["caption"] == 5  # six readable files, two of them the same bytes
    copy, original = result.samples.index(samples[5]), result.samples.index(samples[0])
    assert torch.equal(result.global_[copy], result.global_[original])


def test_a_clip_swap_reuses_cached_captions_and_boxes(tiny_detector, tiny_store, samples, tmp_path, monkeypatch):
    extract(samples, tiny_detector, DiskCache(tmp_path / "cache"))
    swapped = Detector(get_profile("tiny+embed=tiny-clip-quickgelu-alt"), tiny_store, device="cpu")
    calls = StageCalls(swapped, monkeypatch)
    result = extract(samples, swapped, DiskCache(tmp_path / "cache"))
    assert calls.counts["caption"] == 0 and calls.counts["ground"] == 0
    assert calls.counts["embed_images"] >= 5 and result.computed == 6
    assert swapped.stage_versions["embed"] != tiny_detector.stage_versions["embed"]


def test_transformed_inputs_are_cached_apart_from_clean_ones(tiny_detector, samples, tmp_path, monkeypatch):
    readable = samples[:5]
    clean = extract(readable, tiny_detector, DiskCache(tmp_path / "cache"))
    jpeg = parse_transform("jpeg:25")
    calls = StageCalls(tiny_detector, monkeypatch)
    compressed = extract(readable, tiny_detector, DiskCache(tmp_path / "cache"), transform=jpeg)
    assert calls.counts["caption"] == 5  # nothing reused from the clean features
    assert not torch.equal(clean.global_, compressed.global_)
    assert compressed.sha256s == clean.sha256s  # keyed by the source file, with the transform in the version
    versions = cache_versions(tiny_detector, jpeg)
    assert all(version.endswith("|input=jpeg:25") for version in versions.values())


def test_untransformed_keys_are_the_workers_own(tiny_detector):
    versions = cache_versions(tiny_detector)
    assert versions == {kind: tiny_detector.artifact_versions[kind] for kind in ("caption", "ground", "features")}


def test_disk_cache_round_trips_every_kind_and_flushes_whole_shards(tmp_path):
    versions = {"caption": "c1", "ground": "g1", "features": "f1"}
    items = {
        "a" * 64: Artifacts("a cat", [GroundedObject("cat", (1.0, 2.0, 30.0, 40.0), 0.9)], None, _features(1, 1)),
        "b" * 64: Artifacts("nothing", [], None, _features(0, 2)),
    }
    cache = DiskCache(tmp_path, shard_size=2)
    cache.save({"a" * 64: items["a" * 64]}, versions)
    assert not list(tmp_path.rglob("*.safetensors"))  # below the shard size: pending, yet readable
    assert cache.load(["a" * 64], versions)["a" * 64].caption == "a cat"
    cache.save({"b" * 64: items["b" * 64]}, versions)
    assert len(list(tmp_path.rglob("*.safetensors"))) == 3  # one shard per kind once the size is reached
    loaded = DiskCache(tmp_path).load(["a" * 64, "b" * 64, "c" * 64], versions)
    for sha256, expected in items.items():
        assert loaded[sha256].caption == expected.caption and loaded[sha256].objects == expected.objects
        assert torch.equal(loaded[sha256].features.global_, expected.features.global_)
        assert torch.equal(loaded[sha256].features.objects, expected.features.objects)
    assert loaded["c" * 64] == Artifacts()
    assert DiskCache(tmp_path).load(["a" * 64], {"caption": "c2"})["a" * 64].caption is None


def test_a_damaged_shard_is_skipped_and_recomputed(tmp_path):
    cache = DiskCache(tmp_path)
    cache.save({"a" * 64: Artifacts(caption="kept")}, {"caption": "c1"})
    cache.flush()
    shard = next(tmp_path.rglob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:20])
    assert DiskCache(tmp_path).load(["a" * 64], {"caption": "c1"})["a" * 64].caption is None


def test_format_bias_is_flagged_unless_inputs_are_reencoded(tiny_detector, tmp_path):
    samples = []
    for index in range(4):
        real, fake = tmp_path / f"real{index}.jpg", tmp_path / f"fake{index}.png"
        real.write_bytes(encode(noise_image(index), "JPEG", quality=90))
        fake.write_bytes(encode(noise_image(10 + index)))
        samples += [Sample(real, 0, "g"), Sample(fake, 1, "g")]
    result = extract(samples, tiny_detector, DiskCache(tmp_path / "cache"))
    warning = format_bias_warning(result)
    assert warning and "100% JPEG" in warning and "100% PNG" in warning
    assert format_bias_warning(result, parse_transform("jpeg:95")) is None
    same_format = result.subset([i for i, s in enumerate(result.samples) if s.path.suffix == ".png"])
    assert format_bias_warning(same_format) is None  # one class only: nothing to compare


def _features(n_objects: int, seed: int) -> Features:
    generator = torch.Generator().manual_seed(seed)
    return Features(torch.randn(8, generator=generator), torch.randn(n_objects, 8, generator=generator))
