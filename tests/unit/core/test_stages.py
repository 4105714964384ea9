"""Each stage on the tiny profile: loaded through the real loaders, right shapes, deterministic, batch-invariant."""

import pytest
import torch

from pipeline.core.stages.caption import Captioner
from tests.conftest import noise_image

BATCH = [noise_image(seed, 64 + 8 * seed, 96 - 4 * seed) for seed in range(8)]  # mixed sizes on purpose


def test_models_load_through_the_library_loaders(tiny_detector):
    from open_clip.transformer import QuickGELU
    from transformers import Blip2ForConditionalGeneration, GroundingDinoForObjectDetection

    tiny_detector.load()
    assert isinstance(tiny_detector.captioner.model, Blip2ForConditionalGeneration)
    assert isinstance(tiny_detector.grounder.model, GroundingDinoForObjectDetection)
    activations = {type(m) for m in tiny_detector.embedder.model.modules()}
    assert QuickGELU in activations  # OpenAI CLIP weights need QuickGELU, and the tiny twin mirrors that


def test_versions_name_model_revision_and_parameters(tiny_detector):
    caption = tiny_detector.captioner.version
    assert caption.startswith("caption:item/tiny-blip2@seed0.g")
    assert "max_new_tokens=8" in caption
    assert "batch_size" not in tiny_detector.embedder.version  # speed knobs do not invalidate artifacts


def test_version_changes_with_parameters(tiny_detector):
    located = tiny_detector.captioner.located
    changed = Captioner(located, tiny_detector.device)
    changed.params["max_new_tokens"] = 9
    assert changed.version != tiny_detector.captioner.version


def test_caption_batch(tiny_detector):
    captions = tiny_detector.captioner.caption(BATCH)
    assert len(captions) == len(BATCH)
    assert all(isinstance(c, str) and c == c.strip() for c in captions)
    assert any(captions)
    assert tiny_detector.captioner.caption(BATCH) == captions  # deterministic decoding
    assert tiny_detector.captioner.caption([BATCH[3]]) == [captions[3]]  # batch of 1 == same image in batch of 8


def test_ground_batch(tiny_detector):
    phrases = [["dog", "red car"], [], ["tree"], ["sky", "man", "couch"]] * 2
    found = tiny_detector.grounder.ground(BATCH, phrases)
    assert len(found) == len(BATCH)
    assert found[1] == [] and found[5] == []  # no phrases → no objects, and the model is not asked
    limit = tiny_detector.grounder.params["max_objects"]
    for image, image_phrases, objects in zip(BATCH, phrases, found, strict=True):
        assert len(objects) <= min(limit, len(image_phrases))
        for obj in objects:
            assert obj.phrase in image_phrases
            assert obj.score >= tiny_detector.grounder.params["box_threshold"]
            x0, y0, x1, y1 = obj.box
            assert 0 <= x0 < x1 <= image.width and 0 <= y0 < y1 <= image.height
    alone = tiny_detector.grounder.ground([BATCH[3]], [phrases[3]])[0]
    assert [o.phrase for o in alone] == [o.phrase for o in found[3]]
    for one, many in zip(alone, found[3], strict=True):
        assert one.box == pytest.approx(many.box, abs=0.05)
        assert one.score == pytest.approx(many.score, abs=1e-4)


def test_ground_with_no_phrases_anywhere_skips_the_model(tiny_store):
    from pipeline.core.profiles import get_profile
    from pipeline.core.stages.ground import Grounder

    grounder = Grounder(tiny_store.locate(get_profile("tiny").ground), torch.device("cpu"))
    assert grounder.ground(BATCH[:2], [[], []]) == [[], []]
    assert not grounder.loaded


def test_embed_images_and_texts(tiny_detector):
    embedder = tiny_detector.embedder
    images = embedder.embed_images(BATCH)
    texts = embedder.embed_texts(["a dog", "a red car on a road", ""])
    assert images.shape == (8, embedder.dim) and texts.shape == (3, embedder.dim)
    assert images.dtype == torch.float32 and images.device.type == "cpu"
    assert torch.equal(embedder.embed_images(BATCH), images)
    assert torch.allclose(embedder.embed_images([BATCH[5]])[0], images[5], atol=1e-5)
    assert not torch.allclose(images[0], images[1])  # different images, different embeddings


def test_embed_chunks_large_batches(tiny_detector):
    embedder = tiny_detector.embedder
    whole = embedder.embed_images(BATCH)
    embedder.params["batch_size"] = 3
    try:
        chunked = embedder.embed_images(BATCH)
    finally:
        embedder.params["batch_size"] = 64
    assert torch.allclose(whole, chunked, atol=1e-5)


def test_embed_empty_lists(tiny_detector):
    assert tiny_detector.embedder.embed_images([]).shape == (0, tiny_detector.embedder.dim)


def test_each_stage_has_its_own_batch_size_and_chunks_give_the_same_answers(tiny_detector):
    assert tiny_detector.grounder.batch_size == 16 and tiny_detector.captioner.batch_size == 64
    chunked = Captioner(tiny_detector.captioner.located, tiny_detector.device)
    chunked.params["batch_size"] = 3
    assert chunked.version == tiny_detector.captioner.version  # a speed knob, not an output change
    assert chunked.caption(BATCH) == tiny_detector.captioner.caption(BATCH)


def test_a_static_kv_cache_decodes_the_same_captions(tiny_detector):
    static = Captioner(tiny_detector.captioner.located, tiny_detector.device)
    static.params["static_cache"] = True
    assert static.version == tiny_detector.captioner.version
    assert static.caption(BATCH[:4]) == tiny_detector.captioner.caption(BATCH[:4])


class _SmallGpuCaptioner(Captioner):
    """The real captioner on a device that (as a GPU would) runs out of memory on runs of more than 2 images."""

    calls: list[int]

    def _generate_ids(self, pixels):
        self.calls.append(len(pixels))
        if len(pixels) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return super()._generate_ids(pixels)


def test_a_stage_out_of_gpu_memory_halves_its_own_runs_and_keeps_the_size(tiny_detector):
    small = _SmallGpuCaptioner(tiny_detector.captioner.located, tiny_detector.device)
    small.calls = []
    small.params["batch_size"] = 8
    assert small.caption(BATCH) == tiny_detector.captioner.caption(BATCH)  # same answers, in order
    assert small.calls == [8, 4, 2, 2, 2, 2] and small.batch_size == 2  # halved until it fitted, then kept
    small.calls.clear()
    small.caption(BATCH[:4])
    assert small.calls == [2, 2]


def test_an_error_that_is_not_out_of_memory_is_not_retried(tiny_detector):
    class Broken(Captioner):
        def _generate_ids(self, pixels):
            raise RuntimeError("CUDA error: device-side assert triggered")

    with pytest.raises(RuntimeError, match="device-side assert"):
        Broken(tiny_detector.captioner.located, tiny_detector.device).caption(BATCH)


def test_grounding_out_of_memory_redoes_only_grounding(tiny_store):
    from pipeline.core.detector import Detector
    from pipeline.core.imaging import decode_image
    from pipeline.core.profiles import get_profile
    from pipeline.core.stages.ground import Grounder
    from tests.conftest import encode

    class CountingCaptioner(Captioner):
        runs = 0

        def _generate_ids(self, pixels):
            CountingCaptioner.runs += 1
            return super()._generate_ids(pixels)

    class SmallGpuGrounder(Grounder):
        def _ground(self, pixels, images, phrases):
            if len(images) > 1:
                raise torch.OutOfMemoryError("CUDA out of memory.")
            return super()._ground(pixels, images, phrases)

    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    reference = detector.analyze([decode_image(encode(image)) for image in BATCH[:4]])
    detector.captioner = CountingCaptioner(detector.captioner.located, detector.device)
    detector.grounder = SmallGpuGrounder(detector.grounder.located, detector.device)
    analyses = detector.analyze([decode_image(encode(image)) for image in BATCH[:4]])
    assert CountingCaptioner.runs == 1  # captions were made once, before grounding ran out of memory
    assert detector.grounder.batch_size == 1
    assert [a.artifacts.objects for a in analyses] == [a.artifacts.objects for a in reference]
