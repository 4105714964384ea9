"""A model's pixel input in two halves (`PixelRecipe`): resized on the host in uint8, rescaled and normalised on the
device; together they give what the model folder's own transformers image processor gives, within an 8-bit level.

Smooth images (gradients), not noise: on noise any two resampling kernels differ by many levels, and the check would
say nothing about the recipe."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from PIL import Image

from pipeline.core.imaging import PAD_COLOR, letterbox, rgb_pixels
from pipeline.core.model_input import PixelRecipe
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import get_profile

CPU = torch.device("cpu")


def smooth(width: int, height: int) -> Image.Image:
    """An RGB image of three gradients (radial, vertical, mirrored radial) at any size."""
    radial = Image.radial_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    linear = Image.linear_gradient("L").resize((width, height), Image.Resampling.BILINEAR)
    return Image.merge("RGB", (radial, linear, radial.transpose(Image.Transpose.FLIP_LEFT_RIGHT)))


def pictures(side: int) -> list[Image.Image]:
    """Around a model's input `side`: larger and non-square, smaller (upscaled; letterboxed), with the longer side
    at the canvas already (the letterbox's copy-only path), exactly the input size (no resize), a tall one."""
    return [
        smooth(side * 5 // 4, side * 15 // 16),
        smooth(side // 2, side // 3),
        smooth(side, side * 2 // 3),
        smooth(side, side),
        smooth(side // 3, side * 3 // 4),
    ]


@pytest.fixture(scope="module")
def sim_store(tmp_path_factory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("sim-processors"), allow_download=False)


def processor_of(store: ModelStore, profile: str, stage: str):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(store.locate(get_profile(profile).specs[stage]).path).image_processor


def one_level(recipe: PixelRecipe) -> float:
    """One 8-bit step of the input, after normalising: the most a resampled pixel may differ by."""
    return recipe.scale / min(recipe.std)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, recipe: PixelRecipe) -> None:
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype == torch.float32
    difference = (ours - theirs).abs()
    assert float(difference.max()) <= one_level(recipe) * 1.001
    assert float(difference.mean()) <= one_level(recipe) * 0.05  # a stray level here and there, no shift


@pytest.fixture(params=["tiny", "sim"])
def store_and_profile(request, tiny_store, sim_store):
    return (tiny_store if request.param == "tiny" else sim_store), request.param


def test_the_captioners_input_is_its_processors(store_and_profile):
    store, profile = store_and_profile
    processor = processor_of(store, profile, "caption")
    recipe = PixelRecipe.of(processor)
    assert recipe.size == (processor.size["width"], processor.size["height"])
    images = pictures(recipe.size[0])
    ours = recipe.on_device(recipe.host(images), CPU, torch.float32)
    theirs = processor(images=images, return_tensors="pt")["pixel_values"]
    assert ours.shape == (len(images), 3, recipe.size[1], recipe.size[0])
    assert_close(ours, theirs, recipe)


def test_the_grounders_letterboxed_input_is_its_processor_on_the_letterboxed_image(store_and_profile):
    store, profile = store_and_profile
    canvas = int(get_profile(profile).ground.params["canvas"])
    processor = processor_of(store, profile, "ground")
    recipe = PixelRecipe.of(processor, size=(canvas, canvas))
    images = pictures(canvas)
    ours = recipe.on_device(recipe.letterboxed(images, PAD_COLOR), CPU, torch.float32)
    # The stage before: each image letterboxed by Pillow, then the processor resized the square to the canvas.
    size = {"shortest_edge": canvas, "longest_edge": canvas}
    theirs = processor(images=[letterbox(image) for image in images], return_tensors="pt", size=size)["pixel_values"]
    assert ours.shape == (len(images), 3, canvas, canvas)
    assert_close(ours, theirs, recipe)


def test_the_letterbox_pads_bottom_and_right_with_the_pad_colour(tiny_store):
    recipe = PixelRecipe.of(processor_of(tiny_store, "tiny", "ground"), size=(96, 96))
    wide, tall = smooth(96, 60), smooth(30, 96)  # the longer side at the canvas: copied, then padded
    batch = recipe.letterboxed([wide, tall], PAD_COLOR)
    assert torch.equal(batch[0, :60], rgb_pixels(wide)) and torch.equal(batch[1, :, :30], rgb_pixels(tall))
    pad = torch.tensor(PAD_COLOR, dtype=torch.uint8)
    assert bool((batch[0, 60:] == pad).all()) and bool((batch[1, :, 30:] == pad).all())


def test_pillow_images_and_their_pixels_give_the_same_input(tiny_store):
    recipe = PixelRecipe.of(processor_of(tiny_store, "tiny", "ground"), size=(96, 96))
    images = pictures(96)
    pixels = [rgb_pixels(image) for image in images]
    assert all(p.dtype == torch.uint8 and p.shape[2] == 3 for p in pixels)
    host = recipe.host(images)
    assert host.dtype == torch.uint8 and host.shape == (len(images), 96, 96, 3)
    assert torch.equal(host, recipe.host(pixels))
    assert torch.equal(recipe.letterboxed(images, PAD_COLOR), recipe.letterboxed(pixels, PAD_COLOR))
    mixed = [images[0], pixels[1], images[2], pixels[3], images[4]]
    assert torch.equal(host, recipe.host(mixed))


def test_a_filter_torchvision_does_not_port_is_pillows_own(tiny_store):
    recipe = replace(PixelRecipe.of(processor_of(tiny_store, "tiny", "caption")), resample=Image.Resampling.LANCZOS)
    image = smooth(150, 90)
    expected = rgb_pixels(image.resize(recipe.size, Image.Resampling.LANCZOS))
    assert torch.equal(recipe.host([image])[0], expected)
    assert torch.equal(recipe.host([rgb_pixels(image)])[0], expected)


def test_rescaling_and_normalising_follow_the_processors_switches():
    from transformers import BlipImageProcessor

    mean, std = (0.5, 0.25, 0.75), (0.2, 0.4, 0.8)
    processor = BlipImageProcessor(size={"height": 32, "width": 48}, image_mean=list(mean), image_std=list(std))
    recipe = PixelRecipe.of(processor)
    assert recipe.size == (48, 32) and recipe.scale == pytest.approx(1 / 255)
    assert recipe.mean == pytest.approx(mean) and recipe.std == pytest.approx(std)
    assert PixelRecipe.of(processor, size=(20, 20)).size == (20, 20)
    plain = BlipImageProcessor(size={"height": 32, "width": 48}, do_normalize=False, do_rescale=False)
    recipe = PixelRecipe.of(plain)
    assert (recipe.scale, recipe.mean, recipe.std) == (1.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    pixels = torch.arange(2 * 32 * 48 * 3).remainder(256).to(torch.uint8).reshape(2, 32, 48, 3)
    values = recipe.on_device(pixels, CPU, torch.float32)
    assert torch.equal(values, pixels.permute(0, 3, 1, 2).float())  # only the layout changed


def test_the_device_half_gives_the_models_layout_and_dtype(tiny_store):
    recipe = PixelRecipe.of(processor_of(tiny_store, "tiny", "caption"))
    pixels = recipe.host(pictures(64))
    half = recipe.on_device(pixels, CPU, torch.float16)
    full = recipe.on_device(pixels, CPU, torch.float32)
    assert half.dtype == torch.float16 and half.shape == (5, 3, 64, 64)
    assert torch.allclose(half.float(), full, atol=1e-2)
    white = torch.full((1, 64, 64, 3), 255, dtype=torch.uint8)
    expected = [(1.0 - m) / s for m, s in zip(recipe.mean, recipe.std, strict=True)]
    assert recipe.on_device(white, CPU, torch.float32)[0, :, 0, 0].tolist() == pytest.approx(expected, rel=1e-6)
