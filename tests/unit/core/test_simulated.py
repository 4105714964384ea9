"""The simulated device and the `sim` profile: the paper profile's host work for real, each model call holding a
per-process device timeline for a set time; its outputs made up, said so everywhere, and refused by trained heads.

Device times here are a few milliseconds at most, so the waits stay short; every bound on time is a lower one
(sleeping guarantees it), never a speed a machine must reach."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.core import simulated
from pipeline.core.detector import RULE_VERSIONS, Detector, untrained_head
from pipeline.core.errors import HeadError
from pipeline.core.head import Head, HeadMetadata
from pipeline.core.imaging import decode_image, downscale
from pipeline.core.model_store import ModelStore
from pipeline.core.phrases import object_phrases
from pipeline.core.profiles import get_profile
from pipeline.core.simulated import DEVICE_MS, SIMULATED_MARK, SimulatedDevice
from tests.conftest import encode
from worker.settings import SettingsError, load_settings

TIMES = {"caption": 1.0, "ground": 2.0, "embed_image": 0.5, "embed_text": 0.25}  # ms; distinct, to tell them apart
SIM_MAX_PHRASES = 8  # the sim profile's grounder: the paper's limits


def photo(seed: int, size: tuple[int, int]):
    """A decoded JPEG of smooth colour fields (what a photo decodes like; never all one colour)."""
    coarse = (np.random.default_rng(seed).random((6, 8, 3)) * 255).astype(np.uint8)
    return decode_image(encode(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC), "JPEG", quality=90))


# Landscape, portrait, square, and one larger than the 800-pixel canvas (downscaled once, to a pixel tensor).
# Their made-up captions name four distinct objects each.
IMAGES = [photo(0, (320, 240)), photo(3, (200, 300)), photo(5, (300, 300)), photo(12, (1024, 768))]


@pytest.fixture(scope="module")
def sim_store(tmp_path_factory) -> ModelStore:
    return ModelStore(tmp_path_factory.mktemp("sim-models"), allow_download=False)


@pytest.fixture(scope="module")
def sim_detector(sim_store) -> Detector:
    detector = Detector(get_profile("sim"), sim_store, device="cpu")
    detector.use_head(untrained_head(detector))
    return detector


@pytest.fixture
def device():
    """This process's simulated device at TIMES, put back to the defaults afterwards."""
    yield simulated.configure(TIMES)
    simulated.configure(None)


# ---------------------------------------------------------------- the device timeline


def test_launched_work_queues_and_synchronising_waits_for_all_of_it():
    device = SimulatedDevice({"caption": 20.0, "ground": 15.0})
    started = time.perf_counter()
    device.launch("caption", 1)
    device.launch("ground", 2)  # starts when the caption's work ends: 20 + 2 × 15 ms in all
    device.synchronize()
    assert time.perf_counter() - started >= 0.050
    assert device.busy_s == pytest.approx(0.050, abs=1e-12)


def test_launch_returns_before_its_work_ends():
    device = SimulatedDevice({"caption": 10_000.0})  # ten seconds of work, never waited for
    device.launch("caption", 1)
    assert device._free_at - time.perf_counter() > 5  # still running on the device: the host did not wait
    assert device.busy_s == pytest.approx(10.0)


def test_hold_is_launch_then_synchronize():
    device = SimulatedDevice({"embed_image": 5.0})
    started = time.perf_counter()
    device.hold("embed_image", 4)
    assert time.perf_counter() - started >= 0.020
    assert device.busy_s == pytest.approx(0.020, abs=1e-12)
    assert device._free_at <= time.perf_counter()  # nothing left running


def test_an_idle_gap_is_not_busy_time_and_later_work_starts_when_launched():
    device = SimulatedDevice({"caption": 10.0})
    device.hold("caption", 1)
    time.sleep(0.03)  # the device idles
    launched = time.perf_counter()
    device.launch("caption", 1)
    assert device._free_at >= launched + 0.010  # from the launch, not from where the last work ended
    device.synchronize()
    assert time.perf_counter() - launched >= 0.010
    assert device.busy_s == pytest.approx(0.020, abs=1e-12)


def test_synchronize_releases_the_gil_for_other_threads():
    device = SimulatedDevice({"caption": 200.0})
    counted = []

    def count() -> None:
        while not stop.is_set():
            counted.append(1)
            time.sleep(0)

    stop = threading.Event()
    thread = threading.Thread(target=count)
    device.launch("caption", 1)
    thread.start()
    device.synchronize()
    stop.set()
    thread.join()
    assert counted  # the other thread ran while this one waited on the device


def test_times_are_the_defaults_overridden_per_part_and_an_unknown_part_is_an_error():
    device = SimulatedDevice({"ground": 0.5})
    assert device.device_ms == {**DEVICE_MS, "ground": 0.5}
    assert SimulatedDevice().per_image_ms(4) == pytest.approx(6.66)  # 2.46 + 2.0 + 5 × 0.41 + 5 × 0.03
    with pytest.raises(KeyError):
        device.launch("gpu", 1)


def test_configure_replaces_this_processs_device_and_none_restores_the_defaults():
    try:
        configured = simulated.configure({"caption": 3.0})
        assert simulated.device() is configured and configured.device_ms["caption"] == 3.0
        configured.launch("caption", 1)
        restored = simulated.configure(None)
        assert simulated.device() is restored and restored.device_ms == DEVICE_MS and restored.busy_s == 0.0
    finally:
        simulated.configure(None)


# ---------------------------------------------------------------- settings


def test_the_settings_read_simulated_times_and_prepare_ahead(monkeypatch):
    assert load_settings().prepare_ahead == "auto" and load_settings().simulated_device_ms == {}
    monkeypatch.setenv("ITEM_SIMULATED_DEVICE_MS", '{"caption": 0.5, "embed_text": 0}')
    monkeypatch.setenv("ITEM_PREPARE_AHEAD", "false")
    settings = load_settings()
    assert settings.simulated_device_ms == {"caption": 0.5, "embed_text": 0} and settings.prepare_ahead == "off"


@pytest.mark.parametrize(
    "times", [{"gpu": 1}, {"caption": -1}, {"ground": 10_001}, {"embed_image": float("nan")}], ids=str
)
def test_the_settings_refuse_an_unknown_part_or_a_time_out_of_range(times):
    with pytest.raises(SettingsError) as refused:
        load_settings(simulated_device_ms=times)
    assert refused.value.code == "settings.invalid"
    assert "ITEM_SIMULATED_DEVICE_MS" in refused.value.message
    assert all(name in refused.value.message for name in DEVICE_MS)  # says which parts there are


# ---------------------------------------------------------------- the sim profile


def test_the_model_folders_hold_processors_and_configs_but_no_weights(sim_detector, sim_store):
    folders = [sim_store.folder(spec) for spec in sim_detector.profile.specs.values()]
    assert all(folder.is_dir() for folder in folders)
    assert not [path for folder in folders for path in folder.rglob("*.safetensors")]
    assert not [path for folder in folders for path in folder.rglob("*.bin")]
    caption, ground, embed = folders
    for folder in (caption, ground):
        assert (folder / "tokenizer.json").is_file() and (folder / "config.json").is_file()
        assert (folder / "processor_config.json").is_file()
    assert (embed / "open_clip_config.json").is_file()
    assert sim_detector.embedder.dim == 768  # CLIP ViT-L/14's width, read from its config


def test_every_result_says_simulated(sim_detector, device):
    assert sim_detector.profile.simulated and not get_profile("paper").simulated
    assert all(f"|{SIMULATED_MARK}" in version for version in sim_detector.stage_versions.values())
    assert sim_detector.max_side == 800  # the paper grounder's canvas: the same host work as the paper profile
    detections = sim_detector.detect(IMAGES)
    assert [d.sha256 for d in detections] == [image.sha256 for image in IMAGES]
    for detection in detections:
        assert detection.simulated and detection.verdict_reason == SIMULATED_MARK
        assert detection.to_dict()["verdict_reason"] == SIMULATED_MARK
        stages = detection.pipeline_version.stages
        assert all(SIMULATED_MARK in stages[stage] for stage in ("caption", "ground", "embed"))
        phrases = object_phrases(detection.caption, SIM_MAX_PHRASES)
        assert sorted(obj.phrase for obj in detection.objects) == sorted(phrases)
        assert len(detection.objects) == 4, detection.caption
        assert detection.artifacts.features.objects.shape[0] == 4
        assert 0.0 <= detection.p_fake <= 1.0


def test_boxes_are_in_the_originals_pixels(sim_detector, device):
    large = IMAGES[3]
    detection = sim_detector.detect([large])[0]
    objects = detection.objects
    staged = downscale(large.image, sim_detector.max_side)  # the 800 × 600 copy the stages saw
    direct = sim_detector.grounder.ground([staged.pixels], [object_phrases(detection.caption, SIM_MAX_PHRASES)])[0]
    assert staged.scale_x == staged.scale_y == 1.28
    assert len(objects) == 4 and [obj.box for obj in objects] == [staged.to_original(obj.box) for obj in direct]
    for obj in objects:
        x0, y0, x1, y1 = obj.box
        assert 0 <= x0 < x1 <= large.width and 0 <= y0 < y1 <= large.height
        assert obj.score >= 0.35


def test_the_device_is_held_for_exactly_the_work_the_batch_launched(sim_detector, device):
    before = device.busy_s
    detections = sim_detector.detect(IMAGES)
    objects = sum(len(d.objects) for d in detections)
    n = len(IMAGES)
    pictures = texts = n + objects  # each image and its crops; its caption and each object's phrase
    expected_ms = (
        n * TIMES["caption"] + n * TIMES["ground"] + pictures * TIMES["embed_image"] + texts * TIMES["embed_text"]
    )
    assert objects == 4 * n
    assert (device.busy_s - before) * 1000 == pytest.approx(expected_ms, abs=1e-9)
    assert device._free_at <= time.perf_counter()  # the results were copied back: all launched work had ended


def test_stored_captions_and_boxes_hold_only_the_rest_of_the_device(sim_detector, device):
    first = sim_detector.detect(IMAGES[:2])
    before = device.busy_s
    again = sim_detector.detect(IMAGES[:2], [d.artifacts for d in first])  # features known: no model at all
    assert device.busy_s == before
    assert [d.p_fake for d in again] == [d.p_fake for d in first]
    known = [type(d.artifacts)(caption=d.artifacts.caption, objects=d.artifacts.objects) for d in first]
    sim_detector.detect(IMAGES[:2], known)  # only CLIP runs
    objects = sum(len(d.objects) for d in first)
    expected_ms = (2 + objects) * (TIMES["embed_image"] + TIMES["embed_text"])
    assert (device.busy_s - before) * 1000 == pytest.approx(expected_ms, abs=1e-9)


def test_the_same_image_gets_the_same_caption_whatever_its_batch(sim_detector, device):
    batch = sim_detector.detect(IMAGES)
    alone = sim_detector.detect([IMAGES[2]])[0]
    reordered = sim_detector.detect([IMAGES[2], IMAGES[0]])
    assert alone.caption == batch[2].caption == reordered[0].caption
    assert reordered[1].caption == batch[0].caption
    assert sim_detector.detect([IMAGES[2]])[0].objects == alone.objects  # the same batch: the same boxes


def test_an_images_boxes_and_score_do_not_depend_on_its_batch(sim_detector, device):
    batch = sim_detector.detect(IMAGES[:2])
    alone = sim_detector.detect(IMAGES[:1])[0]
    assert [obj.box for obj in alone.objects] == [obj.box for obj in batch[0].objects]
    assert alone.p_fake == pytest.approx(batch[0].p_fake, abs=1e-6)


def test_made_up_captions_vary_from_their_first_words(sim_detector, device):
    extra = [photo(seed, (320, 240)) for seed in range(20, 28)]
    captions = [d.caption for d in sim_detector.detect(IMAGES + extra)]
    assert len({caption.split(" next to ")[0] for caption in captions}) > 1


def test_every_made_up_caption_names_four_objects(sim_detector, device):
    extra = [photo(seed, (320, 240)) for seed in range(20, 28)]
    assert [len(d.objects) for d in sim_detector.detect(extra)] == [4] * len(extra)


# ---------------------------------------------------------------- heads


@pytest.mark.parametrize("training", [{}, {"epochs": 20, "images": 1000}, {"untrained": False}], ids=str)
def test_a_trained_head_refuses_the_simulated_stages(sim_store, training):
    detector = Detector(get_profile("sim"), sim_store, device="cpu")
    metadata = HeadMetadata(
        profile="sim",
        stage_versions=detector.stage_versions,  # exactly the stages it would score: only the simulation differs
        input_dim=detector.embedder.dim,
        training=training,
        rules=dict(RULE_VERSIONS),
    )
    with pytest.raises(HeadError) as refused:
        detector.use_head(Head.create(metadata))
    assert refused.value.code == "head.simulated_refused"
    assert detector.head is None
    with pytest.raises(ValueError, match="needs a head"):
        detector.detect(IMAGES[:1])


def test_the_worker_refuses_a_head_file_with_the_sim_profile(sim_store, tmp_path):
    from worker.gpu.build import build_detector

    detector = Detector(get_profile("sim"), sim_store, device="cpu")
    metadata = HeadMetadata(
        profile="sim", stage_versions=detector.stage_versions, input_dim=detector.embedder.dim,
        training={"epochs": 20}, rules=dict(RULE_VERSIONS),
    )  # fmt: skip
    path = Head.create(metadata).save(tmp_path / "head")
    settings = load_settings(
        profile="sim", head=path, model_dir=sim_store.model_dir, allow_download=False, device="cpu"
    )
    try:
        with pytest.raises(HeadError) as refused:
            build_detector(settings)
    finally:
        simulated.configure(None)
    assert refused.value.code == "head.simulated_refused"


def test_the_worker_runs_the_sim_profile_on_the_untrained_head_at_the_settings_times(sim_store):
    from worker.gpu.build import build_detector

    settings = load_settings(
        profile="sim", head="untrained", model_dir=sim_store.model_dir, allow_download=False, device="cpu",
        simulated_device_ms={"ground": 0.5},
    )  # fmt: skip
    try:
        detector = build_detector(settings)
        assert detector.head.untrained and detector.profile.simulated
        assert simulated.device().device_ms == {**DEVICE_MS, "ground": 0.5}
    finally:
        simulated.configure(None)
