"""Two visibly different families of generated images, for the offline demo and the tests.

`smooth`: bright, warm, soft gradients with blurred blobs, standing in for "real". `patterned`: dark, cool
stripes and checkers with pixel noise, standing in for "fake". They differ in brightness and hue as well as
texture on purpose: random encoders keep coarse statistics like these, so with the tiny random models the
demo shows that a signal survives the whole pipeline, not that detection works.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

FAMILIES = ("smooth", "patterned")  # label 0, label 1


def make_image(family: str, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    width, height = int(rng.integers(64, 160)), int(rng.integers(64, 160))
    if family == "smooth":
        pixels = _smooth(rng, width, height)
    elif family == "patterned":
        pixels = _patterned(rng, width, height)
    else:
        raise ValueError(f"Unknown family {family!r}; choose from {FAMILIES}.")
    image = Image.fromarray(pixels, "RGB")
    return image.filter(ImageFilter.GaussianBlur(3)) if family == "smooth" else image


def _smooth(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    warm = np.array([1.0, 0.8, 0.55])
    start, end = warm * rng.uniform(170, 255), warm * rng.uniform(170, 255)
    angle = rng.uniform(0, np.pi)
    t = (np.cos(angle) * x + np.sin(angle) * y)[..., None]
    pixels = start + (end - start) * t
    for _ in range(3):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.1, 0.3)
        blob = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))[..., None]
        pixels = pixels * (1 - 0.5 * blob) + warm * rng.uniform(120, 255) * 0.5 * blob
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _patterned(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    period = int(rng.integers(3, 9))
    mask = ((x // period + y // period) % 2) if rng.random() < 0.5 else ((x + y) // period % 2)
    cool = np.array([0.35, 0.5, 1.0])
    light, dark = cool * rng.uniform(90, 160), cool * rng.uniform(0, 40)
    pixels = np.where(mask[..., None] == 1, light, dark).astype(np.float64)
    pixels += rng.normal(0, 40, pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_benchmark(
    folder: Path, groups: Sequence[str] = ("gen-a", "gen-b"), per_class: int = 8, seed: int = 0, fmt: str = "PNG"
) -> Path:
    """A labelled set in the benchmark layout (`folder/<group>/0_real|1_fake/`): smooth images as real,
    patterned as fake, for trying `item train|eval|calibrate` offline."""
    suffix = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}[fmt]
    for group_index, group in enumerate(groups):
        for label, (family, subfolder) in enumerate(zip(FAMILIES, ("0_real", "1_fake"), strict=True)):
            target = folder / group / subfolder
            target.mkdir(parents=True, exist_ok=True)
            for index in range(per_class):
                image_seed = seed * 1_000_003 + group_index * 100_003 + label * 10_007 + index
                make_image(family, image_seed).save(target / f"{family}-{index:04d}.{suffix}", fmt)
    return folder
