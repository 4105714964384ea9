"""Unit tests for pipeline.core.transforms: each perturbation checked against the definition it claims to implement.

Expected values are derived here (noise statistics, the blur's spread, the IJG quantisation formula), never
copied from a previous run of the code under test.
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from pipeline.core.transforms import (
    IDENTITY,
    PAPER_PERTURBATIONS,
    Chain,
    GaussianBlur,
    GaussianNoise,
    JpegCompression,
    jpeg_bytes,
    parse_transform,
    perturbation,
)

# The IJG (libjpeg) standard luminance quantisation table, JPEG spec Annex K.1, at quality 50.
IJG_LUMINANCE = (
    (16, 11, 10, 16, 24, 40, 51, 61),
    (12, 12, 14, 19, 26, 58, 60, 55),
    (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62),
    (18, 22, 37, 56, 68, 109, 103, 77),
    (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101),
    (72, 92, 95, 98, 112, 100, 103, 99),
)


def flat_image(value: int, size: int = 256) -> Image.Image:
    return Image.new("RGB", (size, size), (value, value, value))


def textured_image(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8), mode="RGB")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64)


def ijg_scaled_table(quality: int) -> list[int]:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return [min(max((base * scale + 50) // 100, 1), 255) for row in IJG_LUMINANCE for base in row]


# --- noise ----------------------------------------------------------------------------------------------------


def test_noise_has_the_requested_spread_and_no_bias():
    sigma = 0.01
    grey = flat_image(128)
    difference = pixels(GaussianNoise(sigma)(grey)) - pixels(grey)
    assert difference.std() == pytest.approx(sigma * 255, rel=0.05)
    assert abs(difference.mean()) < 0.05 * sigma * 255


def test_noise_is_deterministic_per_image():
    noise = GaussianNoise(0.01)
    image = flat_image(128, size=64)
    assert np.array_equal(pixels(noise(image)), pixels(noise(image)))


def test_noise_differs_between_images_and_between_sigmas():
    first, second = flat_image(128, size=64), flat_image(100, size=64)
    noise = GaussianNoise(0.01)
    first_noise = pixels(noise(first)) - pixels(first)
    second_noise = pixels(noise(second)) - pixels(second)
    assert not np.array_equal(first_noise, second_noise)
    assert not np.array_equal(pixels(GaussianNoise(0.005)(first)), pixels(GaussianNoise(0.006)(first)))


def test_noise_keeps_size_and_mode():
    image = textured_image(0, size=33)
    out = GaussianNoise(0.005)(image)
    assert out is not image and out.mode == "RGB" and out.size == image.size


# --- blur -----------------------------------------------------------------------------------------------------


def spatial_std_along_x(image: Image.Image) -> float:
    weights = pixels(image).sum(axis=(0, 2))  # intensity per column
    columns = np.arange(weights.size)
    mean = (weights * columns).sum() / weights.sum()
    return math.sqrt((weights * (columns - mean) ** 2).sum() / weights.sum())


@pytest.mark.parametrize("sigma", [1, 2, 3])
def test_blur_spreads_an_impulse_by_sigma_pixels(sigma):
    # A one-pixel-wide white line rather than a single white pixel: a point blurred by σ=3 peaks at ~4.5 grey
    # levels, and rounding to 8 bits then erases its tails (std ~2.6). The line's profile along x is the same
    # Gaussian with a peak of ~34, which survives quantisation.
    size = 41
    array = np.zeros((size, size, 3), dtype=np.uint8)
    array[:, size // 2, :] = 255
    blurred = GaussianBlur(sigma)(Image.fromarray(array, mode="RGB"))
    assert spatial_std_along_x(blurred) == pytest.approx(sigma, rel=0.10)


def test_blur_filters_each_channel_on_its_own():
    array = np.zeros((21, 21, 3), dtype=np.uint8)
    array[10, 10, 0] = 255  # only red
    blurred = pixels(GaussianBlur(1)(Image.fromarray(array, mode="RGB")))
    assert blurred[..., 0].sum() > 0
    assert blurred[..., 1:].sum() == 0


def test_blur_keeps_a_flat_image_flat():
    grey = flat_image(77, size=32)
    assert np.array_equal(pixels(GaussianBlur(2)(grey)), pixels(grey))


# --- jpeg -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("quality", [75, 50, 25])
def test_jpeg_uses_the_ijg_scaled_luminance_table(quality):
    with Image.open(io.BytesIO(jpeg_bytes(textured_image(1), quality))) as encoded:
        luminance = list(encoded.quantization[0])
    # Pillow may hand the table back in zigzag order; the multiset of entries is order-free.
    assert sorted(luminance) == sorted(ijg_scaled_table(quality))


def test_jpeg_tables_differ_between_qualities():
    # Guards the test above against a formula that happens to give the same multiset for every quality.
    assert len({tuple(sorted(ijg_scaled_table(q))) for q in (75, 50, 25)}) == 3


@pytest.mark.parametrize("quality", [90, 25])
def test_jpeg_transform_is_the_decoded_jpeg(quality):
    image = textured_image(2)
    with Image.open(io.BytesIO(jpeg_bytes(image, quality))) as encoded:
        expected = pixels(encoded.convert("RGB"))
    out = JpegCompression(quality)(image)
    assert out.mode == "RGB" and out.size == image.size
    assert np.array_equal(pixels(out), expected)
    assert not np.array_equal(pixels(out), pixels(image))  # it did compress


# --- chains, ids and parsing ----------------------------------------------------------------------------------


def test_chain_applies_steps_in_order():
    image = textured_image(3)
    chain = Chain((JpegCompression(95), GaussianBlur(1)))
    expected = GaussianBlur(1)(JpegCompression(95)(image))
    assert np.array_equal(pixels(chain(image)), pixels(expected))
    assert chain.id == "jpeg:95>blur:1"


def test_identity_is_a_copy():
    image = textured_image(4)
    out = IDENTITY(image)
    assert IDENTITY.id == "none" and out is not image
    assert np.array_equal(pixels(out), pixels(image))


@pytest.mark.parametrize(
    "text",
    [
        "none",
        "noise:0.005",
        "noise:0.001",
        "blur:2",
        "blur:0.5",
        "jpeg:75",
        "jpeg:95>blur:1",
        "blur:1>noise:0.01>jpeg:50",
    ],
)
def test_parse_transform_round_trips_ids(text):
    chain = parse_transform(text)
    assert isinstance(chain, Chain)
    assert chain.id == text
    assert parse_transform(chain.id) == chain


def test_parse_transform_normalises_spelling():
    assert parse_transform(" Blur:2.0 > JPEG:075 ").id == "blur:2>jpeg:75"
    assert parse_transform("NONE") == IDENTITY
    assert parse_transform("noise:1e-3").steps == (GaussianNoise(0.001),)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "blur",
        "blur:",
        "blur:abc",
        "blur:0",
        "blur:-1",
        "blur:nan",
        "noise:inf",
        "jpeg:0",
        "jpeg:101",
        "jpeg:75.5",
        "sharpen:1",
        "jpeg:95>",
        "none>blur:1",
        "jpeg:95>>blur:1",
    ],
)
def test_parse_transform_rejects_bad_text(text):
    with pytest.raises(ValueError, match="Accepted"):
        parse_transform(text)


@pytest.mark.parametrize(
    "make",
    [
        lambda: GaussianNoise(0),
        lambda: GaussianBlur(float("inf")),
        lambda: JpegCompression(0),
        lambda: JpegCompression(7.5),
    ],
)
def test_constructors_validate_ranges(make):
    with pytest.raises(ValueError):
        make()


def test_transforms_refuse_non_rgb_images():
    with pytest.raises(ValueError, match="RGB"):
        GaussianBlur(1)(Image.new("L", (8, 8)))


def test_paper_perturbations_build_the_matching_transforms():
    ids = [perturbation(kind, level).id for kind, levels in PAPER_PERTURBATIONS.items() for level in levels]
    assert ids == [
        "noise:0.001",
        "noise:0.005",
        "noise:0.01",
        "blur:1",
        "blur:2",
        "blur:3",
        "jpeg:75",
        "jpeg:50",
        "jpeg:25",
    ]
    with pytest.raises(ValueError, match="noise, blur, jpeg"):
        perturbation("rotate", 90)
