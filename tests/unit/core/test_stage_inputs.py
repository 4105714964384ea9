"""What the detector hands its stages: each image downscaled once, boxes back in the original's pixels."""

import pytest
import torch
from PIL import Image

from pipeline.core import imaging
from pipeline.core.detector import Detector
from pipeline.core.imaging import downscale, picture_size, rgb_pixels
from pipeline.core.model_input import PixelRecipe
from pipeline.core.phrases import object_phrases
from pipeline.core.profiles import get_profile
from pipeline.core.results import Artifacts
from pipeline.core.stages.embed import Embedder
from tests.conftest import decoded

CAPTION = "a dog on a red car near a tree and a man"  # four phrases the tiny grounder finds on seed 1


@pytest.fixture
def received(tiny_detector, monkeypatch):
    """The images each stage is handed, by stage (instrumentation: the models still run)."""
    seen = {"caption": [], "ground": [], "embed": []}
    for name, stage, method in (
        ("caption", tiny_detector.captioner, "caption"),
        ("ground", tiny_detector.grounder, "ground"),
        ("embed", tiny_detector.embedder, "embed_images"),
    ):

        def recording(images, *rest, _name=name, _method=getattr(stage, method)):
            seen[_name] += images
            return _method(images, *rest)

        monkeypatch.setattr(stage, method, recording)
    return seen


def test_the_side_is_the_largest_any_stage_uses(tiny_detector):
    # tiny: the grounder's 96-pixel canvas, against 64-pixel BLIP-2 and CLIP inputs
    sides = [stage.input_side for stage in (tiny_detector.captioner, tiny_detector.grounder, tiny_detector.embedder)]
    assert sides == [64, 96, 64] and tiny_detector.max_side == 96


def test_a_large_image_is_downscaled_once_and_every_stage_gets_that_copy(tiny_detector, received, monkeypatch):
    resized_from = []  # (width, height) of every picture resized, by Pillow or by the torch kernels
    pil_resize, bicubic, recipe_resize = Image.Image.resize, imaging._bicubic, PixelRecipe._resized

    def counting_pil(self, *args, **kwargs):
        resized_from.append(self.size)
        return pil_resize(self, *args, **kwargs)

    def counting_bicubic(image, size):
        resized_from.append(image.size)
        return bicubic(image, size)

    def counting_recipe(self, pixels):
        resized_from.append((pixels.shape[1], pixels.shape[0]))
        return recipe_resize(self, pixels)

    monkeypatch.setattr(Image.Image, "resize", counting_pil)
    monkeypatch.setattr(imaging, "_bicubic", counting_bicubic)
    monkeypatch.setattr(PixelRecipe, "_resized", counting_recipe)
    image = decoded(0, 3000, 2000)
    analysis = tiny_detector.analyze([image])[0]
    assert resized_from.count((3000, 2000)) == 1  # the one downscale: no stage resized the upload itself
    copies = received["caption"] + received["ground"] + received["embed"]
    assert len(copies) == 3 and all(copy is copies[0] for copy in copies)  # the same copy, three times
    assert picture_size(copies[0]) == (96, 64)
    assert analysis.timings_ms["prepare"] > 0


def test_boxes_of_a_downscaled_image_are_in_the_originals_pixels(tiny_detector):
    image = decoded(1, 3000, 2000)
    objects = tiny_detector.analyze([image], [Artifacts(caption=CAPTION)])[0].artifacts.objects
    staged = downscale(image.image, tiny_detector.max_side)
    direct = tiny_detector.grounder.ground([staged.image], [object_phrases(CAPTION, 4)])[0]
    assert objects and [obj.box for obj in objects] == [staged.to_original(obj.box) for obj in direct]
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 < x1 <= 3000 and 0 <= y0 < y1 <= 2000
    assert max(obj.box[2] for obj in objects) > 96  # not in the 96-pixel copy's coordinates


def test_stored_boxes_crop_the_same_pictures_as_fresh_ones(tiny_detector):
    image = decoded(1, 3000, 2000)
    fresh = tiny_detector.analyze([image], [Artifacts(caption=CAPTION)])[0].artifacts
    stored = tiny_detector.analyze([image], [Artifacts(caption=CAPTION, objects=fresh.objects)])[0].artifacts
    assert stored.embeddings.object_images.allclose(fresh.embeddings.object_images, atol=1e-5)


def test_a_small_image_reaches_the_stages_untouched(tiny_detector, received):
    image = decoded(2, 80, 60)
    tiny_detector.analyze([image])
    first = received["caption"][0]  # its pixels, copied out of Pillow once and handed to every stage
    assert all(copy is first for copies in received.values() for copy in copies)
    assert torch.equal(first, rgb_pixels(image.image))
    assert len(received["caption"]) == 1


def test_grounding_off_reports_the_whole_original(tiny_store):
    detector = Detector(get_profile("tiny+ground=off"), tiny_store, device="cpu")
    assert detector.max_side == 96  # the canvas of the grounder it replaces
    analysis = detector.analyze([decoded(3, 3000, 2000)], [Artifacts(caption=CAPTION)])[0]
    assert {obj.box for obj in analysis.artifacts.objects} == {(0.0, 0.0, 3000.0, 2000.0)}


def test_new_stage_inputs_mean_new_artifact_keys(tiny_store, monkeypatch):
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    new = detector.artifact_versions
    assert all("|max_side=96" in new[kind] for kind in ("caption", "ground", "embed"))
    assert "|impl=2," in new["embed"]
    # the keys from before: full-size images for every stage, PIL crops for CLIP
    monkeypatch.setattr(detector, "max_side", None)
    monkeypatch.setattr(Embedder, "implementation", 1)
    old = detector.artifact_versions
    assert all(old[kind] != new[kind] for kind in ("caption", "ground", "embed", "features"))


def test_grounding_off_keeps_the_captions_of_the_profile_it_ablates(tiny_store):
    # the same downscaled copy for the captioner and CLIP: the ablation changes the boxes alone
    full = Detector(get_profile("tiny"), tiny_store, device="cpu")
    off = Detector(get_profile("tiny+ground=off"), tiny_store, device="cpu")
    assert off.artifact_versions["caption"] == full.artifact_versions["caption"]
    assert off.artifact_versions["ground"] != full.artifact_versions["ground"]
