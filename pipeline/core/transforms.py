"""Deterministic image perturbations: the paper's robustness study (noise, blur, JPEG) and format re-encoding.

In the core because a head may be trained on transformed inputs (`item train --reencode jpeg:95`): the detector
then applies the same transform wherever it scores (scan, the worker, re-scores), or it would serve another
detector than the one trained.

Evaluation results are cached by transform id, so a transform must be a pure function of the input pixels:
the same image always comes out the same, even the "random" noise, which is seeded from the pixels themselves.
That way a cached score and a fresh one can never disagree, and two runs of `item eval` are comparable.

Every transform takes and returns an RGB `PIL.Image.Image` of the same size; decoding untrusted bytes is
`pipeline.core.imaging`'s job, not this module's.
"""

from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image

ACCEPTED_FORMS = ('"none"', '"noise:SIGMA"', '"blur:SIGMA"', '"jpeg:QUALITY"', 'a chain such as "jpeg:95>blur:1"')
CHAIN_SEPARATOR = ">"

# The levels of the paper's robustness figure (Fig. 4): noise σ on a [0, 1] scale, blur σ in pixels, JPEG quality.
PAPER_PERTURBATIONS: dict[str, tuple[float, ...]] = {
    "noise": (0.001, 0.005, 0.01),
    "blur": (1, 2, 3),
    "jpeg": (75, 50, 25),
}


def _require_rgb(image: Image.Image) -> np.ndarray:
    if image.mode != "RGB":
        raise ValueError(
            f"Transforms accept RGB images only; got mode {image.mode!r}. Decode with pipeline.core.imaging."
        )
    return np.asarray(image, dtype=np.uint8)


def _to_uint8_image(values: np.ndarray) -> Image.Image:
    """Round to the nearest grey level (not truncate, which would darken every image by half a level on average)."""
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="RGB")


def _positive_sigma(name: str, sigma: float) -> float:
    value = float(sigma)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} sigma must be a finite number > 0; got {sigma!r}.")
    return value


def _quality(quality: float) -> int:
    try:
        as_int = int(quality)
    except (TypeError, ValueError, OverflowError):
        as_int = None
    if isinstance(quality, bool) or as_int is None or as_int != quality or not 1 <= as_int <= 100:
        raise ValueError(f"JPEG quality must be an integer from 1 to 100; got {quality!r}.")
    return as_int


@dataclass(frozen=True)
class GaussianNoise:
    """Additive Gaussian noise, N(0, sigma²), with sigma in intensity units on a [0, 1] scale (the paper's σ).

    The noisy image is re-quantised to 8 bits, as any saved image would be, so small sigmas mostly vanish:
    σ=0.001 is about 0.26 grey levels and changes only a few percent of the values.

    The noise is seeded from a SHA-256 of the pixels and the transform id, so it is deterministic per image
    while still differing between images and between sigmas.
    """

    sigma: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", _positive_sigma("Noise", self.sigma))

    @property
    def id(self) -> str:
        return f"noise:{self.sigma:g}"

    def __call__(self, image: Image.Image) -> Image.Image:
        pixels = _require_rgb(image)
        rng = np.random.default_rng(self._seed(pixels))
        unit = pixels.astype(np.float64) / 255.0
        noisy = np.clip(unit + rng.normal(0.0, self.sigma, size=unit.shape), 0.0, 1.0)
        return _to_uint8_image(noisy * 255.0)

    def _seed(self, pixels: np.ndarray) -> int:
        digest = hashlib.sha256()
        digest.update(repr(pixels.shape).encode())  # same bytes in another shape are another image
        digest.update(pixels.tobytes())
        digest.update(self.id.encode())
        return int.from_bytes(digest.digest()[:8], "big")


@dataclass(frozen=True)
class GaussianBlur:
    """Gaussian blur with sigma in pixels, each channel filtered on its own (as CNNDetection's augmentation does)."""

    sigma: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma", _positive_sigma("Blur", self.sigma))

    @property
    def id(self) -> str:
        return f"blur:{self.sigma:g}"

    def __call__(self, image: Image.Image) -> Image.Image:
        from scipy.ndimage import gaussian_filter  # scipy is slow to import; only blurring needs it

        pixels = _require_rgb(image).astype(np.float64)
        blurred = np.stack([gaussian_filter(pixels[..., c], sigma=self.sigma) for c in range(3)], axis=-1)
        return _to_uint8_image(blurred)


def jpeg_bytes(image: Image.Image, quality: int) -> bytes:
    """The image encoded as JPEG at this quality, with Pillow's defaults for everything else (4:2:0 chroma)."""
    _require_rgb(image)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=_quality(quality))
    return buffer.getvalue()


@dataclass(frozen=True)
class JpegCompression:
    """A JPEG round trip at one quality (1..100): the compression artefacts a re-uploaded image picks up."""

    quality: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "quality", _quality(self.quality))

    @property
    def id(self) -> str:
        return f"jpeg:{self.quality}"

    def __call__(self, image: Image.Image) -> Image.Image:
        with Image.open(io.BytesIO(jpeg_bytes(image, self.quality))) as decoded:
            return decoded.convert("RGB")


Step = GaussianNoise | GaussianBlur | JpegCompression


@dataclass(frozen=True)
class Chain:
    """Steps applied in order. The empty chain is the identity, so callers need not special-case "no transform"."""

    steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))  # a list would make the chain unhashable

    @property
    def id(self) -> str:
        return CHAIN_SEPARATOR.join(step.id for step in self.steps) if self.steps else "none"

    def __call__(self, image: Image.Image) -> Image.Image:
        if not self.steps:
            _require_rgb(image)
            return image.copy()  # a new image, like every other transform, so callers may mutate it
        for step in self.steps:
            image = step(image)
        return image


IDENTITY = Chain(())

_STEP_TYPES: dict[str, Callable[[float], Step]] = {
    "noise": GaussianNoise,
    "blur": GaussianBlur,
    "jpeg": JpegCompression,
}


def _bad_transform(text: str, reason: str) -> ValueError:
    return ValueError(f"Cannot read transform {text!r}: {reason}. Accepted: {', '.join(ACCEPTED_FORMS)}.")


def _parse_number(kind: str, value: str) -> float:
    # JPEG quality is read as an integer so that "jpeg:75.5" is refused rather than silently rounded.
    return int(value) if kind == "jpeg" else float(value)


def _parse_step(text: str, whole: str) -> Step:
    kind, colon, value = text.strip().partition(":")
    kind = kind.strip().lower()
    if not colon or kind not in _STEP_TYPES:
        raise _bad_transform(whole, f"{text.strip()!r} is not a known step")
    try:
        number = _parse_number(kind, value.strip())
    except ValueError:
        raise _bad_transform(whole, f"{value.strip()!r} is not a valid {kind} value") from None
    try:
        return _STEP_TYPES[kind](number)
    except ValueError as error:
        raise _bad_transform(whole, str(error).rstrip(".")) from None


def parse_transform(text: str) -> Chain:
    """Read a transform id back: "none", "noise:0.005", "blur:2", "jpeg:75", or steps joined by ">"."""
    if not isinstance(text, str) or not text.strip():
        raise _bad_transform(str(text), "it is empty")
    if text.strip().lower() == "none":
        return IDENTITY
    return Chain(tuple(_parse_step(part, text) for part in text.split(CHAIN_SEPARATOR)))


def perturbation(kind: str, level: float) -> Step:
    """The transform for one point of the paper's robustness study, e.g. perturbation("blur", 2)."""
    if kind not in _STEP_TYPES:
        raise ValueError(f"Unknown perturbation kind {kind!r}; known kinds: {', '.join(_STEP_TYPES)}.")
    return _STEP_TYPES[kind](level)
