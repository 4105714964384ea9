"""Profiles and the model store: clear errors for unknown or missing models; tiny models built offline."""

import hashlib

import pytest

from pipeline.core.errors import ModelUnavailableError, ProfileError
from pipeline.core.model_store import ModelStore
from pipeline.core.profiles import PROFILES, get_profile


def test_profiles_cover_paper_small_and_tiny():
    assert {"paper", "small", "tiny"} <= set(PROFILES)
    paper = get_profile("paper")
    assert paper.caption.repo_id == "Salesforce/blip2-opt-2.7b"
    assert paper.embed.params["quick_gelu"] is True
    assert get_profile("tiny").meaningless_scores and not paper.meaningless_scores


def test_unknown_profile_names_the_known_ones():
    with pytest.raises(ProfileError, match="paper, paper-random, sim, small, small-random, tiny"):
        get_profile("huge")


def test_missing_model_offline_names_it_and_how_to_get_it(tmp_path):
    store = ModelStore(tmp_path, allow_download=False)
    with pytest.raises(ModelUnavailableError) as missing:
        store.locate(get_profile("paper").caption)
    error = missing.value
    assert error.code == "model.missing" and not error.permanent
    assert "Salesforce/blip2-opt-2.7b" in error.message and "item models pull" in error.message
    assert str(tmp_path) in error.message


def test_hf_hub_offline_turns_downloads_off(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert not ModelStore(tmp_path, allow_download=True).allow_download


def test_tiny_models_are_generated_deterministically(tmp_path):
    spec = get_profile("tiny").embed
    first = ModelStore(tmp_path / "a").locate(spec)
    second = ModelStore(tmp_path / "b").locate(spec)
    digest = [
        hashlib.sha256((m.path / "open_clip_model.safetensors").read_bytes()).hexdigest() for m in (first, second)
    ]
    assert digest[0] == digest[1]
    assert first.revision == second.revision == "seed0.g1"
    assert not any(p.name.startswith(".") for p in (tmp_path / "a").iterdir())  # no staging folder left behind


def test_present_model_is_not_rebuilt(tiny_store):
    spec = get_profile("tiny").caption
    located = tiny_store.locate(spec)
    stamp = (located.path / "model.safetensors").stat().st_mtime_ns
    assert tiny_store.locate(spec).path == located.path
    assert (located.path / "model.safetensors").stat().st_mtime_ns == stamp


def test_open_clip_config_is_written_for_weight_only_clip_repos(tmp_path):
    import json

    from pipeline.core.open_clip_files import write_open_clip_config

    architecture, tag = get_profile("paper").embed.open_clip
    write_open_clip_config(tmp_path, architecture, tag)
    config = json.loads((tmp_path / "open_clip_config.json").read_text())
    assert config["model_cfg"]["quick_gelu"] is True and config["model_cfg"]["embed_dim"] == 768
    assert config["model_cfg"]["vision_cfg"]["patch_size"] == 14
    assert config["preprocess_cfg"]["image_size"] == 224
    assert config["preprocess_cfg"]["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_an_existing_open_clip_config_is_kept(tmp_path):
    from pipeline.core.open_clip_files import write_open_clip_config

    (tmp_path / "open_clip_config.json").write_text("{}")
    write_open_clip_config(tmp_path, "ViT-L-14-quickgelu", "openai")
    assert (tmp_path / "open_clip_config.json").read_text() == "{}"


# ------------------------------------------------------------------ swapped profiles (ablations)


def test_a_swapped_profile_has_a_canonical_name_and_the_swapped_specs():
    swapped = get_profile("tiny + clip=tiny-clip-quickgelu-alt + ground=off")
    assert swapped.name == "tiny+ground=whole-image+embed=tiny-clip-quickgelu-alt"  # stage order, canonical names
    assert get_profile(swapped.name) == swapped
    assert swapped.caption == get_profile("tiny").caption
    assert swapped.embed.name == "tiny-clip-quickgelu-alt" and swapped.meaningless_scores


def test_swapping_in_the_same_model_gives_the_base_profile():
    assert get_profile("paper+embed=clip-vit-l-14-openai") == get_profile("paper")


def test_grounding_off_keeps_the_base_profiles_limits():
    assert get_profile("paper+ground=off").ground.params == {"max_objects": 8, "max_phrases": 8, "canvas": 800}
    assert get_profile("tiny+ground=off").ground.params == {"max_objects": 4, "max_phrases": 4, "canvas": 96}


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("tiny+colour=blue", "'colour' is not a stage"),
        ("tiny+embed=clip-vit-h", "Unknown embed model 'clip-vit-h'"),
        ("huge+embed=clip-rn50-openai", "Unknown model profile 'huge'"),
    ],
)
def test_bad_swaps_name_what_is_accepted(name, message):
    with pytest.raises(ProfileError, match=message):
        get_profile(name)


def test_grounding_off_needs_no_model_and_is_its_own_stage_version(tiny_store):
    spec = get_profile("tiny+ground=off").ground
    assert tiny_store.is_present(spec) and not (tiny_store.model_dir / spec.name).exists()
    located = tiny_store.locate(spec)
    assert located.revision == "builtin"
