"""The detector as a whole: results, batch invariance, and reuse of stored artifacts."""

from dataclasses import replace

import pytest
import torch

from pipeline.core import misalignment as eq
from pipeline.core.detector import Detector
from pipeline.core.phrases import object_phrases
from pipeline.core.profiles import get_profile
from pipeline.core.results import Artifacts
from tests.conftest import decoded, random_head

IMAGES = [decoded(seed, 60 + 10 * seed, 80) for seed in range(8)]


@pytest.fixture
def calls(tiny_detector, monkeypatch):
    """Counts the items each model stage is asked to process (instrumentation: the models still run)."""
    counts = {"caption": 0, "ground": 0, "embed": 0}

    def counting(name, method):
        def wrapper(items, *args):
            counts[name] += len(items)
            return method(items, *args)

        return wrapper

    monkeypatch.setattr(tiny_detector.captioner, "caption", counting("caption", tiny_detector.captioner.caption))
    monkeypatch.setattr(tiny_detector.grounder, "ground", counting("ground", tiny_detector.grounder.ground))
    monkeypatch.setattr(tiny_detector.embedder, "embed_texts", counting("embed", tiny_detector.embedder.embed_texts))
    return counts


def test_detection_fields(tiny_detector):
    detections = tiny_detector.detect(IMAGES)
    assert len(detections) == len(IMAGES)
    for image, d in zip(IMAGES, detections, strict=True):
        assert d.sha256 == image.sha256
        assert 0.0 <= d.p_fake <= 1.0
        assert d.verdict == ("fake" if d.p_fake >= d.threshold else "real")
        assert d.object_count == len(d.objects) == d.artifacts.features.objects.shape[0]
        assert set(d.timings_ms) == {"prepare", "caption", "ground", "embed", "head"}
        assert d.pipeline_version.stages == {**tiny_detector.stage_versions, "head": tiny_detector.head.version}
        for obj in d.objects:
            expected = float(eq.magnitudes(d.artifacts.features.objects)[d.objects.index(obj)])
            assert obj.misalignment == pytest.approx(expected)
    as_dict = detections[0].to_dict()
    assert {"sha256", "p_fake", "verdict", "caption", "objects", "object_count", "pipeline_version"} <= set(as_dict)


def test_batch_of_one_matches_the_same_image_in_a_batch_of_eight(tiny_detector):
    batch = tiny_detector.detect(IMAGES)
    for index in (0, 5):
        alone = tiny_detector.detect([IMAGES[index]])[0]
        assert alone.caption == batch[index].caption
        assert [o.phrase for o in alone.objects] == [o.phrase for o in batch[index].objects]
        assert alone.p_fake == pytest.approx(batch[index].p_fake, abs=1e-5)


def test_probability_follows_eq8_and_the_head(tiny_detector):
    d = tiny_detector.detect(IMAGES[:1])[0]
    features = d.artifacts.features
    D = eq.representation(features.global_, features.objects, tiny_detector.head.metadata.w1, 1.0)
    assert d.p_fake == pytest.approx(float(tiny_detector.head.predict(D[None])[0]), abs=1e-6)


def test_known_features_run_no_model(tiny_detector, calls):
    first = tiny_detector.detect(IMAGES)
    calls.update(caption=0, ground=0, embed=0)
    again = tiny_detector.detect([None] * len(IMAGES), [d.artifacts for d in first])
    assert calls == {"caption": 0, "ground": 0, "embed": 0}
    assert [d.p_fake for d in again] == [d.p_fake for d in first]
    assert all(d.timings_ms["caption"] == 0.0 for d in again)


def test_known_caption_and_boxes_skip_to_clip(tiny_detector, calls):
    first = tiny_detector.detect(IMAGES[:4])
    calls.update(caption=0, ground=0, embed=0)
    known = [Artifacts(caption=d.artifacts.caption, objects=d.artifacts.objects) for d in first]
    again = tiny_detector.detect(IMAGES[:4], known)
    assert calls["caption"] == 0 and calls["ground"] == 0
    assert calls["embed"] == sum(1 + d.object_count for d in first)  # one text per caption and per phrase
    assert [d.p_fake for d in again] == pytest.approx([d.p_fake for d in first], abs=1e-6)


def test_mixed_batch_only_computes_what_is_missing(tiny_detector, calls):
    first = tiny_detector.detect(IMAGES[:2])
    calls.update(caption=0, ground=0, embed=0)
    tiny_detector.detect(IMAGES[:4], [first[0].artifacts, first[1].artifacts, None, None])
    assert calls["caption"] == 2


def test_known_artifacts_are_not_mutated(tiny_detector):
    known = Artifacts(caption="a dog on a couch")
    tiny_detector.detect(IMAGES[:1], [known])
    assert known.objects is None and known.features is None


def test_no_grounded_object_uses_global_distance(tiny_detector):
    d = tiny_detector.detect(IMAGES[:1], [Artifacts(caption="is on the")])[0]  # no noun phrase at all
    assert d.object_count == 0
    D = 2 * d.artifacts.features.global_
    assert d.p_fake == pytest.approx(float(tiny_detector.head.predict(D[None])[0]), abs=1e-6)


def test_missing_pixels_without_artifacts_is_an_error(tiny_detector):
    with pytest.raises(ValueError, match="no pixels"):
        tiny_detector.detect([None])


def test_detect_needs_a_head(tiny_store):
    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    with pytest.raises(ValueError, match="head"):
        detector.detect(IMAGES[:1])
    assert len(detector.analyze(IMAGES[:1])) == 1


def test_artifact_keys_chain_upstream_versions(tiny_store):
    base = Detector(get_profile("tiny"), tiny_store, device="cpu")
    tiny = get_profile("tiny")
    new_caption = replace(tiny, caption=replace(tiny.caption, params={**tiny.caption.params, "max_new_tokens": 6}))
    new_clip = replace(tiny, embed=replace(tiny.embed, params={**tiny.embed.params, "quick_gelu": False}))
    recaptioned = Detector(new_caption, tiny_store, device="cpu").artifact_versions
    reclipped = Detector(new_clip, tiny_store, device="cpu").artifact_versions
    keys = base.artifact_versions
    # a new captioner invalidates everything downstream of it
    assert all(recaptioned[stage] != keys[stage] for stage in ("caption", "ground", "embed", "features"))
    # a new CLIP keeps captions and boxes
    assert reclipped["caption"] == keys["caption"] and reclipped["ground"] == keys["ground"]
    assert reclipped["embed"] != keys["embed"] and reclipped["features"] != keys["features"]


def test_pipeline_version_id_changes_with_the_head(tiny_detector):
    other = Detector(get_profile("tiny"), _store(tiny_detector), device="cpu")
    other.use_head(random_head(other, seed=1))
    assert other.pipeline_version.id != tiny_detector.pipeline_version.id
    assert other.pipeline_version.caption == tiny_detector.pipeline_version.caption


def _store(detector):
    from pipeline.core.model_store import ModelStore

    return ModelStore(detector.captioner.located.path.parent, allow_download=False)


def test_representation_uses_the_heads_weights(tiny_detector):
    features = tiny_detector.detect(IMAGES[:1])[0].artifacts.features
    other = Detector(get_profile("tiny"), _store(tiny_detector), device="cpu")
    other.use_head(random_head(other, w1=1.0, w2=0.0))
    assert torch.allclose(other.representation(features), features.global_)


def test_grounding_off_places_every_phrase_on_the_whole_image(tiny_store):
    detector = Detector(get_profile("tiny+ground=off"), tiny_store, device="cpu")
    images = [decoded(seed, 90 + seed, 70) for seed in range(4)]
    analyses = detector.analyze(images)
    assert detector.stage_versions["ground"].startswith("ground:item/whole-image@builtin")
    found_any = False
    for image, analysis in zip(images, analyses, strict=True):
        phrases = object_phrases(analysis.artifacts.caption, 4)
        assert [obj.phrase for obj in analysis.artifacts.objects] == phrases[:4]
        for obj in analysis.artifacts.objects:
            assert obj.box == (0.0, 0.0, float(image.width), float(image.height)) and obj.score == 1.0
            found_any = True
        assert analysis.artifacts.features.objects.shape[0] == len(analysis.artifacts.objects)
    assert found_any  # the tiny captions do yield phrases, so the check above ran
