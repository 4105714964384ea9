"""A stage's precision is a versioned parameter: what it really runs at on this device, in its version."""

import pytest
import torch

from pipeline.core.devices import compute_precision, effective_precision
from pipeline.core.stages.caption import Captioner
from pipeline.core.stages.embed import Embedder
from pipeline.core.stages.ground import make_grounder
from tests.conftest import noise_image

CPU = torch.device("cpu")


def test_a_cpu_runs_tf32_and_fp16_as_fp32_and_keeps_bf16():
    assert [effective_precision(p, CPU) for p in ("fp32", "tf32", "bf16", "fp16")] == ["fp32", "fp32", "bf16", "fp32"]
    assert effective_precision("fp16", torch.device("cuda")) == "fp16"  # no GPU needed to decide
    with pytest.raises(ValueError, match="int8"):
        effective_precision("int8", CPU)


def test_the_precision_used_is_in_the_stage_version(tiny_detector):
    # The captioner asks for fp16 (BLIP-2's published precision); on a CPU it runs, and says, fp32.
    assert "precision=fp32" in tiny_detector.captioner.version
    located = tiny_detector.embedder.located
    bf16 = Embedder(located, CPU, precision="bf16")
    assert "precision=bf16" in bf16.version and bf16.version != tiny_detector.embedder.version
    assert Embedder(located, CPU, precision="tf32").version == tiny_detector.embedder.version  # fp32 here


def test_grounding_off_has_no_precision(tiny_store):
    from pipeline.core.profiles import get_profile

    off = make_grounder(tiny_store.locate(get_profile("tiny+ground=off").ground), CPU, precision="bf16")
    assert "precision" not in off.version


def test_bf16_embeddings_move_a_little_and_stay_float32(tiny_detector):
    images = [noise_image(seed) for seed in range(3)]
    reference = tiny_detector.embedder.embed_images(images)
    bf16 = Embedder(tiny_detector.embedder.located, CPU, precision="bf16")
    moved = bf16.embed_images(images)
    assert moved.dtype == torch.float32 and moved.shape == reference.shape
    error = float((moved - reference).norm() / reference.norm())
    assert 0 < error < 0.05  # bf16 keeps 8 bits of mantissa: a real but small change


def test_a_bf16_captioner_loads_bf16_weights(tiny_detector):
    captioner = Captioner(tiny_detector.captioner.located, CPU, precision="bf16")
    captioner.load()
    assert next(captioner.model.parameters()).dtype == torch.bfloat16
    assert len(captioner.caption([noise_image(1)])) == 1


def test_the_tf32_switch_is_put_back_after_a_stage():
    before = torch.backends.cuda.matmul.allow_tf32
    with compute_precision("tf32", CPU):
        assert torch.backends.cuda.matmul.allow_tf32 is False  # a CPU has no TF32
    assert torch.backends.cuda.matmul.allow_tf32 == before
