"""Misalignment features for whole datasets: computed once per image and pipeline version, then reused.

Training, ablations, evaluations and calibration all start from the same per-image artifacts, so they are
cached under the detector's artifact version keys (each chains the versions of the stages it came from) plus
the id of any input transform (a perturbation, a re-encoding). A changed CLIP backbone therefore reuses the
cached captions and boxes, a changed captioner reuses nothing, and features of perturbed images never mix
with clean ones. The cache is a folder of append-only shards (`DiskCache`), or the worker's ledger.

Extraction goes batch by batch and writes what it computed as it goes: an interrupted run resumes where it
stopped. Files that cannot be read or decoded are reported with their error code and skipped.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.core import codec
from pipeline.core import misalignment as eq
from pipeline.core.batches import Input, Reader, batched, once_per_image
from pipeline.core.defaults import DEFAULT_FEATURE_DIR, DEFAULT_MAX_BYTES, DEFAULT_MAX_PIXELS
from pipeline.core.detector import Detector
from pipeline.core.errors import ItemError
from pipeline.core.files import read_image_file
from pipeline.core.imaging import sniff_format
from pipeline.core.results import Artifacts
from pipeline.core.transforms import IDENTITY, Chain
from pipeline.lab.datasets import Sample

# Embeddings are not cached: they are the largest artifact, and nothing downstream of them needs them once
# the features exist. Captions and boxes are, because they are the expensive part and survive a CLIP swap.
CACHED_KINDS = ("caption", "ground", "features")


def cache_versions(detector: Detector, transform: Chain = IDENTITY) -> dict[str, str]:
    """The cache key of each cached artifact kind, for images that go through `transform` here and then
    through the detector's own (its head's). These are the worker's own keys, so a cache in the ledger shares
    artifacts with the checks the worker ran, and features extracted for training with `--reencode T` are the
    ones a head trained on them finds when it is evaluated or served."""
    versions = detector.artifact_versions_under(effective_transform(detector, transform))
    return {kind: versions[kind] for kind in CACHED_KINDS}


def effective_transform(detector: Detector, transform: Chain = IDENTITY) -> Chain:
    """What an image goes through in all: `transform` here, then the detector's own."""
    return Chain((*transform.steps, *detector.input_transform.steps))


class ArtifactCache(Protocol):
    def load(self, sha256s: Sequence[str], versions: dict[str, str]) -> dict[str, Artifacts]: ...

    def save(self, items: dict[str, Artifacts], versions: dict[str, str]) -> None: ...

    def flush(self) -> None: ...


class DiskCache:
    """Artifacts in `root/<kind>/<version hash>/*.safetensors`: append-only shards, never rewritten.

    A shard holds one uint8 tensor with the float32 rows of all its entries, and a JSON index in the file's
    metadata (sha256, payload, byte range per entry). Shards are written to a temporary name and renamed, so a
    killed run leaves whole shards or none. Reads index every shard of a version folder once per process.
    """

    def __init__(self, root: Path | str = DEFAULT_FEATURE_DIR, shard_size: int = 512):
        self.root = Path(root).expanduser()
        self.shard_size = shard_size
        self._indexes: dict[tuple[str, str], dict[str, tuple[Path, dict, int, int]]] = {}
        self._pending: dict[tuple[str, str], list[tuple[str, dict, bytes | None]]] = {}
        self._written = 0

    def load(self, sha256s: Sequence[str], versions: dict[str, str]) -> dict[str, Artifacts]:
        found = {sha256: Artifacts() for sha256 in sha256s}
        for kind, version in versions.items():
            index, by_shard = self._index(kind, version), {}
            for sha256 in found:
                if sha256 in index:
                    path, payload, start, length = index[sha256]
                    by_shard.setdefault(path, []).append((sha256, payload, start, length))
            for path, entries in by_shard.items():
                for sha256, payload, vectors in _read_entries(path, entries):
                    codec.set_field(found[sha256], kind, codec.decode(kind, payload, vectors))
            for sha256, payload, vectors in self._pending.get((kind, version), []):
                if sha256 in found:
                    codec.set_field(found[sha256], kind, codec.decode(kind, payload, vectors))
        return found

    def save(self, items: dict[str, Artifacts], versions: dict[str, str]) -> None:
        for kind, version in versions.items():
            index, pending = self._index(kind, version), self._pending.setdefault((kind, version), [])
            known = {sha256 for sha256, _, _ in pending}
            for sha256, artifacts in items.items():
                value = codec.get_field(artifacts, kind)
                if value is not None and sha256 not in index and sha256 not in known:
                    pending.append((sha256, *codec.encode(kind, value)))
                    known.add(sha256)
            if len(pending) >= self.shard_size:
                self._write(kind, version)

    def flush(self) -> None:
        for kind, version in list(self._pending):
            self._write(kind, version)

    def _folder(self, kind: str, version: str) -> Path:
        return self.root / kind / codec.version_hash(version)

    def _index(self, kind: str, version: str) -> dict[str, tuple[Path, dict, int, int]]:
        key = (kind, version)
        if key not in self._indexes:
            index: dict[str, tuple[Path, dict, int, int]] = {}
            folder = self._folder(kind, version)
            for path in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
                for sha256, payload, start, length in _shard_entries(path, version):
                    index.setdefault(sha256, (path, payload, start, length))
            self._indexes[key] = index
        return self._indexes[key]

    def _write(self, kind: str, version: str) -> None:
        entries = self._pending.pop((kind, version), [])
        if not entries:
            return
        folder = self._folder(kind, version)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "VERSION").write_text(version + "\n")  # for people reading the folder; reads check shards
        rows, blobs, offset = [], [], 0
        for sha256, payload, vectors in entries:
            length = -1 if vectors is None else len(vectors)
            rows.append([sha256, payload, offset, length])
            if vectors is not None:
                blobs.append(vectors)
                offset += length
        self._written += 1
        path = folder / f"{time.time_ns()}-{os.getpid()}-{self._written}.safetensors"
        staging = path.with_suffix(".tmp")
        tensor = torch.frombuffer(bytearray(b"".join(blobs)), dtype=torch.uint8) if offset else torch.zeros(0)
        metadata = {"version": version, "entries": json.dumps(rows)}
        save_file({"vectors": tensor.to(torch.uint8)}, staging, metadata=metadata)
        os.replace(staging, path)
        index = self._index(kind, version)
        for sha256, payload, start, length in rows:
            index.setdefault(sha256, (path, payload, start, length))


def _shard_entries(path: Path, version: str) -> list[tuple[str, dict, int, int]]:
    """A shard's index; an unreadable shard or one written for another version (a hash collision) is skipped."""
    try:
        with safe_open(path, "pt") as shard:
            metadata = shard.metadata() or {}
        if metadata.get("version") != version:
            return []
        return [(sha256, payload, start, length) for sha256, payload, start, length in json.loads(metadata["entries"])]
    except Exception:
        return []  # its entries are simply computed again


def _read_entries(path: Path, entries: list[tuple[str, dict, int, int]]):
    """(sha256, payload, vectors) of the wanted entries, reading only their byte ranges of the shard."""
    with safe_open(path, "pt") as shard:
        vectors = shard.get_slice("vectors")
        for sha256, payload, start, length in entries:
            yield sha256, payload, (vectors[start : start + length].numpy().tobytes() if length >= 0 else None)


# ---------------------------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Failure:
    path: Path
    code: str
    message: str


@dataclass
class FeatureSet:
    """The misalignment parts of every readable sample, row-aligned with `samples`."""

    samples: list[Sample]
    sha256s: list[str]
    formats: list[str]  # the file format each image arrived in (for the format-bias guard)
    global_: torch.Tensor  # (n, d) D_g, Eq. 3
    local: torch.Tensor  # (n, d) D_l, Eq. 7 (D_g where nothing was grounded)
    n_objects: torch.Tensor  # (n,)
    failures: list[Failure] = field(default_factory=list)
    computed: int = 0  # images that ran at least one model
    reused: int = 0  # images answered from the cache alone

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([sample.label for sample in self.samples], dtype=torch.long)

    @property
    def groups(self) -> list[str]:
        return [sample.group for sample in self.samples]

    def representation(self, w1: float = eq.DEFAULT_W1, w2: float = eq.DEFAULT_W2) -> torch.Tensor:
        """D for every image, Eq. 8: w1 = 0 is the local-only ablation, w2 = 0 the global-only one."""
        return eq.combine(self.global_, self.local, w1, w2)

    def subset(self, rows: Sequence[int]) -> FeatureSet:
        rows = list(rows)
        index = torch.tensor(rows, dtype=torch.long)
        return replace(
            self,
            samples=[self.samples[i] for i in rows],
            sha256s=[self.sha256s[i] for i in rows],
            formats=[self.formats[i] for i in rows],
            global_=self.global_[index],
            local=self.local[index],
            n_objects=self.n_objects[index],
        )


@dataclass
class _Kept:
    """What is kept of a readable sample: D_g, D_l and the object count, not its bytes or pixels."""

    sample: Sample
    sha256: str
    format: str
    features: tuple[torch.Tensor, torch.Tensor, int]


def extract(
    samples: Sequence[Sample],
    detector: Detector,
    cache: ArtifactCache,
    *,
    transform: Chain = IDENTITY,
    batch_size: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_bytes: int = DEFAULT_MAX_BYTES,
    progress: Callable[[int], None] = lambda n: None,
) -> FeatureSet:
    """The features of every sample, computing (and caching) only what the cache lacks.

    A sample's bytes are read and hashed first; only those the cache has no features for are decoded.
    """
    versions = cache_versions(detector, transform)
    kept: list[_Kept] = []
    failures: list[Failure] = []
    computed = reused = 0
    reader = Reader(max_pixels=max_pixels, max_bytes=max_bytes, transform=transform if transform.steps else None)
    try:
        for batch in batched(samples, batch_size):
            inputs = reader.read(batch, lambda sample: read_image_file(sample.path, max_bytes))
            formats = _formats(inputs)
            readable = [one for one in inputs if one.ok]
            known = cache.load(sorted({one.sha256 for one in readable}), versions)
            missing = [one for one in readable if known[one.sha256].features is None]
            decoded = [one for one in reader.decode(missing) if one.ok]
            computed += _analyze(detector, cache, versions, decoded, known)
            reused += len(readable) - len(missing)
            for one in inputs:
                if one.ok:
                    kept.append(_Kept(one.item, one.sha256, formats[id(one)], _parts(known[one.sha256])))
                else:
                    failures.append(Failure(one.item.path, one.error.code, str(one.error)))
            progress(len(batch))
    finally:
        cache.flush()
    return _feature_set(kept, failures, computed, reused)


def _formats(inputs: list[Input[Sample]]) -> dict[int, str]:
    """The file format of each input read, by magic number (for the format-bias guard); not an image: an error."""
    formats = {}
    for one in inputs:
        if one.ok:
            try:
                formats[id(one)] = sniff_format(one.data)
            except ItemError as error:
                one.error = error
    return formats


def _analyze(detector: Detector, cache: ArtifactCache, versions, inputs: list[Input[Sample]], known) -> int:
    """Runs the missing stages once per distinct image and stores what they produced; returns images run."""
    analyses = once_per_image(detector.analyze, {one.sha256: one.image for one in inputs}, known)
    results = {sha256: analysis.artifacts for sha256, analysis in analyses.items()}
    if results:
        cache.save(results, versions)
        known.update(results)
    return len(inputs)


def _parts(artifacts: Artifacts) -> tuple[torch.Tensor, torch.Tensor, int]:
    """D_g, D_l (Eq. 7, with the no-object rule) and the object count: all that training and scoring need."""
    features = artifacts.features
    return features.global_, eq.local_misalignment(features.objects, features.global_), features.objects.shape[0]


def _feature_set(items: list[_Kept], failures, computed: int, reused: int) -> FeatureSet:
    dim = items[0].features[0].shape[-1] if items else 0  # no readable image: no width, and no model to ask
    return FeatureSet(
        samples=[item.sample for item in items],
        sha256s=[item.sha256 for item in items],
        formats=[item.format for item in items],
        global_=torch.stack([item.features[0] for item in items]) if items else torch.empty(0, dim),
        local=torch.stack([item.features[1] for item in items]) if items else torch.empty(0, dim),
        n_objects=torch.tensor([item.features[2] for item in items], dtype=torch.long),
        failures=failures,
        computed=computed,
        reused=reused,
    )


# ------------------------------------------------------------------------------------------ format bias

FORMAT_BIAS_LIMIT = 0.3  # total-variation distance between the classes' format mixes that earns a warning


def format_shares(features: FeatureSet) -> dict[str, dict[str, float]]:
    """The share of each file format among real and among fake images."""
    shares: dict[str, dict[str, float]] = {}
    for label, name in ((0, "real"), (1, "fake")):
        formats = [fmt for fmt, sample in zip(features.formats, features.samples, strict=True) if sample.label == label]
        shares[name] = {fmt: formats.count(fmt) / len(formats) for fmt in sorted(set(formats))}
    return shares


def format_bias_warning(features: FeatureSet, transform: Chain = IDENTITY) -> str | None:
    """A warning when real and fake images arrive in visibly different formats and nothing evens them out.

    Detectors are known to learn "JPEG vs PNG" instead of "real vs fake" when benchmarks store the classes
    differently; re-encoding every image alike (`--reencode jpeg:95`) takes that shortcut away.
    """
    if any(step.id.startswith("jpeg:") for step in transform.steps):
        return None
    shares = format_shares(features)
    real, fake = shares["real"], shares["fake"]
    if not real or not fake:
        return None
    distance = sum(abs(real.get(fmt, 0.0) - fake.get(fmt, 0.0)) for fmt in {*real, *fake}) / 2
    if distance <= FORMAT_BIAS_LIMIT:
        return None
    return (
        f"real and fake images come in different file formats (real: {_mix(real)}; fake: {_mix(fake)}): a head can "
        "learn the format instead of fakeness. Re-encode all images alike with --reencode jpeg:95."
    )


def _mix(shares: dict[str, float]) -> str:
    return ", ".join(f"{share:.0%} {fmt}" for fmt, share in sorted(shares.items(), key=lambda kv: -kv[1]))
