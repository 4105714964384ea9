"""Heads on disk: safetensors + JSON, exact round trip, and refusal to score other models' features."""

import json
from dataclasses import asdict

import pytest
import torch

from pipeline.core.errors import HeadError
from pipeline.core.head import Head, HeadMetadata, head_paths

FEATURES = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
VERSIONS = {"caption": "caption:a@1", "ground": "ground:b@1", "embed": "embed:c@1"}


def make_head(seed=0, **overrides) -> Head:
    metadata = HeadMetadata(profile="tiny", stage_versions=VERSIONS, input_dim=32, hidden=8, **overrides)
    return Head.create(metadata, seed=seed)


def test_round_trip_keeps_predictions_metadata_and_version(tmp_path):
    head = make_head(threshold=0.7, training={"epochs": 3})
    weights = head.save(tmp_path / "h.safetensors")
    loaded = Head.load(weights)
    assert torch.equal(loaded.predict(FEATURES), head.predict(FEATURES))
    assert asdict(loaded.metadata) == asdict(head.metadata)
    assert loaded.version == head.version


def test_files_are_safetensors_and_readable_json(tmp_path):
    weights = make_head().save(tmp_path / "h")
    header_length = int.from_bytes(weights.read_bytes()[:8], "little")
    header = json.loads(weights.read_bytes()[8 : 8 + header_length])
    assert {"0.weight", "0.bias", "2.weight", "2.bias"} <= set(header)
    meta = json.loads(weights.with_suffix(".json").read_text())
    assert meta["stage_versions"] == VERSIONS and meta["w1"] == 1.0 and meta["hidden"] == 8


def test_version_changes_with_weights_or_metadata():
    assert make_head(seed=0).version == make_head(seed=0).version
    assert make_head(seed=0).version != make_head(seed=1).version
    assert make_head(threshold=0.5).version != make_head(threshold=0.6).version
    assert make_head(training={"seconds": 1}).version == make_head(training={"seconds": 2}).version


def test_mismatched_stage_versions_are_refused():
    head = make_head()
    head.check_compatible(VERSIONS)
    with pytest.raises(HeadError) as refused:
        head.check_compatible({**VERSIONS, "embed": "embed:other@2"})
    assert refused.value.code == "head.version_mismatch"
    assert "embed" in refused.value.message and "embed:other@2" in refused.value.message


def test_detector_refuses_a_head_for_other_models(tiny_detector):
    from tests.conftest import random_head

    head = random_head(tiny_detector)
    head.metadata.stage_versions["caption"] = "caption:Salesforce/blip2-opt-2.7b@abc"
    with pytest.raises(HeadError, match="caption"):
        tiny_detector.use_head(head)


def test_missing_and_corrupt_heads_have_codes(tmp_path):
    with pytest.raises(HeadError) as missing:
        Head.load(tmp_path / "nothing.safetensors")
    assert missing.value.code == "head.missing"
    weights = make_head().save(tmp_path / "h")
    weights.with_suffix(".json").write_text("{not json")
    with pytest.raises(HeadError) as corrupt:
        Head.load(weights)
    assert corrupt.value.code == "head.corrupt"


def test_weights_that_do_not_fit_the_metadata_are_corrupt(tmp_path):
    weights = make_head().save(tmp_path / "h")
    meta = json.loads(weights.with_suffix(".json").read_text())
    meta["hidden"] = 9
    weights.with_suffix(".json").write_text(json.dumps(meta))
    with pytest.raises(HeadError) as corrupt:
        Head.load(weights)
    assert corrupt.value.code == "head.corrupt"


def test_a_head_is_named_by_file_stem_or_folder(tmp_path):
    expected = (tmp_path / "head.safetensors", tmp_path / "head.json")
    assert head_paths(tmp_path) == expected
    assert head_paths(tmp_path / "head") == expected
    assert head_paths(tmp_path / "head.json") == expected


def test_probabilities_are_softmax_of_the_fake_logit():
    head = make_head()
    logits = head.module(FEATURES)
    assert torch.allclose(head.predict(FEATURES), torch.softmax(logits, dim=-1)[:, 1])


def test_heads_saved_before_the_transform_field_keep_their_version_and_transform(tmp_path):
    # given a head as saved before `input_transform` and `rules` were fields (its transform in the summary)
    old = Head.create(HeadMetadata("tiny", VERSIONS, input_dim=8, hidden=4, training={"input_transform": "jpeg:95"}))
    path = old.save(tmp_path / "old")
    legacy = {
        k: v
        for k, v in json.loads(path.with_suffix(".json").read_text()).items()
        if k not in ("input_transform", "rules")
    }
    path.with_suffix(".json").write_text(json.dumps(legacy))
    plain = Head.create(HeadMetadata("tiny", VERSIONS, input_dim=8, hidden=4))
    # when it is loaded, then the transform is read from the summary, and an untransformed head's version is
    # what it was (the new fields at their defaults do not enter the hash)
    assert Head.load(path).metadata.input_transform == "jpeg:95"
    new_fields = ("training", "input_transform", "rules", "threshold_low", "groups")
    scoring = {k: v for k, v in asdict(plain.metadata).items() if k not in new_fields}
    assert plain.version == _version_of(scoring, plain)


def _version_of(scoring: dict, head: Head) -> str:
    import hashlib

    digest = hashlib.sha256(json.dumps(scoring, sort_keys=True).encode())
    for name, tensor in sorted(head.module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return f"head:{digest.hexdigest()[:16]}"


def test_the_transform_and_the_rules_enter_the_version_and_the_check():
    base = HeadMetadata("tiny", VERSIONS, input_dim=8, hidden=4)
    versions = {
        Head.create(HeadMetadata(**{**asdict(base), **change})).version
        for change in ({}, {"input_transform": "jpeg:95"}, {"rules": {"phrases": "chunker:1"}})
    }
    assert len(versions) == 3
    trained = Head.create(HeadMetadata(**{**asdict(base), "rules": {"phrases": "chunker:0"}}))
    with pytest.raises(HeadError) as refused:
        trained.check_compatible(VERSIONS, {"phrases": "chunker:1", "features": "f"})
    assert refused.value.code == "head.version_mismatch" and "chunker:0" in refused.value.message
    Head.create(base).check_compatible(VERSIONS, {"phrases": "chunker:1"})  # recorded no rules: today's assumed


def test_the_detector_applies_its_heads_transform_before_every_stage(tiny_store):
    from pipeline.core.detector import RULE_VERSIONS, Detector
    from pipeline.core.imaging import DecodedImage
    from pipeline.core.profiles import get_profile
    from pipeline.core.transforms import parse_transform
    from tests.conftest import decoded, random_head

    detector = Detector(get_profile("tiny"), tiny_store, device="cpu")
    head = random_head(detector, input_transform="jpeg:40", rules=dict(RULE_VERSIONS))
    detector.use_head(head)
    image = decoded(5)
    assert all(key.endswith("|input=jpeg:40") for key in detector.artifact_versions.values())
    transformed = DecodedImage(**{**vars(image), "image": parse_transform("jpeg:40")(image.image)})
    plain = Detector(get_profile("tiny"), tiny_store, device="cpu")
    plain.use_head(random_head(plain, rules=dict(RULE_VERSIONS)))
    served, by_hand = detector.analyze([image])[0], plain.analyze([transformed])[0]
    assert torch.equal(served.artifacts.features.global_, by_hand.artifacts.features.global_)
    assert not torch.equal(served.artifacts.features.global_, plain.analyze([image])[0].artifacts.features.global_)


def test_an_attribution_head_has_one_output_per_group_and_its_p_fake_is_all_but_real(tmp_path):
    # given an attribution head over real and two generators, saved and loaded back
    groups = ["real", "gen_a", "gen_b"]
    head = Head.create(HeadMetadata("tiny", VERSIONS, input_dim=8, hidden=4, groups=groups), seed=3)
    loaded = Head.load(head.save(tmp_path / "attr"))
    features = torch.randn(5, 8)
    # when it scores, then each row's shares sum to one and P(fake) is one minus the real share
    shares = loaded.attribute(features)
    assert shares.shape == (5, 3)
    assert torch.allclose(shares.sum(dim=1), torch.ones(5))
    assert torch.allclose(loaded.predict(features), 1 - shares[:, 0])
    assert loaded.metadata.groups == groups and loaded.version == head.version
    # and a binary head refuses to attribute, while groups that do not start with "real" are refused
    with pytest.raises(HeadError):
        Head.create(HeadMetadata("tiny", VERSIONS, input_dim=8, hidden=4)).attribute(features)
    with pytest.raises(HeadError):
        HeadMetadata("tiny", VERSIONS, input_dim=8, groups=["gen_a", "real"])
