"""Shared fixtures: one tiny model directory per test session, generated offline and loaded back."""

from __future__ import annotations

import io
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from pipeline.core.detector import Detector
from pipeline.core.head import Head, HeadMetadata
from pipeline.core.imaging import DecodedImage, decode_image
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile

# xdist's worker processes start with COLUMNS=80 in their environment: rich's consoles, made when worker.cli is
# imported, would keep that width for good, and a test's own COLUMNS (given to CliRunner) would be ignored.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_store(model_dir) -> ModelStore:
    return ModelStore(model_dir, allow_download=False)


@pytest.fixture(scope="session")
def tiny_detector(tiny_store) -> Detector:
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    detector.use_head(random_head(detector))
    return detector


def random_head(detector: Detector, seed: int = 0, **overrides) -> Head:
    metadata = HeadMetadata(
        profile="tiny", stage_versions=detector.stage_versions, input_dim=detector.embedder.dim, hidden=16, **overrides
    )
    return Head.create(metadata, seed=seed)


def encode(image: Image.Image, fmt: str = "PNG", **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_args)
    return buffer.getvalue()


def noise_image(seed: int, width: int = 96, height: int = 72) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def decoded(seed: int, width: int = 96, height: int = 72) -> DecodedImage:
    return decode_image(encode(noise_image(seed, width, height)))


def count_stage_images(detector: Detector) -> Counter:
    """Instruments a detector's model stages: the returned counter counts the images each one is asked to process.

    Proof by what ran, not by how long it took, that stored artifacts spared a stage.
    """
    seen: Counter = Counter()
    for stage, owner, name in (
        ("caption", detector.captioner, "caption"),
        ("ground", detector.grounder, "ground"),
        ("embed", detector.embedder, "embed_images"),
    ):
        method = getattr(owner, name)

        def counted(images, *rest, _stage=stage, _method=method, **kwargs):
            seen[_stage] += len(images)
            return _method(images, *rest, **kwargs)

        setattr(owner, name, counted)
    return seen
