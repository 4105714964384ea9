"""Eq. 3-8 against vectors worked out by hand."""

import math

import pytest
import torch

from pipeline.core import misalignment as eq

# Worked by hand: I0 = (3, 4) → (0.6, 0.8); T0 = (0, 2) → (0, 1); D_g = (0.6, -0.2).
I0, T0, D_G = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 2.0]), torch.tensor([0.6, -0.2])
# Objects: (1, 0) vs (0, 1) → (1, -1); (0, 5) vs (0, 1) → (0, 0). Their mean D_l = (0.5, -0.5).
OBJ_I, OBJ_T = torch.tensor([[1.0, 0.0], [0.0, 5.0]]), torch.tensor([[0.0, 1.0], [0.0, 1.0]])
D_OBJ, D_L = torch.tensor([[1.0, -1.0], [0.0, 0.0]]), torch.tensor([0.5, -0.5])


def test_eq3_normalises_each_side_then_subtracts():
    assert torch.allclose(eq.misalignment(I0, T0), D_G)
    assert torch.allclose(eq.misalignment(OBJ_I, OBJ_T), D_OBJ)


def test_eq3_ignores_scale_of_either_embedding():
    assert torch.allclose(eq.misalignment(7 * I0, 0.1 * T0), D_G)


def test_eq7_averages_objects():
    assert torch.allclose(eq.local_misalignment(D_OBJ, D_G), D_L)


def test_no_object_rule_uses_global_distance():
    assert torch.allclose(eq.local_misalignment(torch.empty(0, 2), D_G), D_G)


@pytest.mark.parametrize(
    ("w1", "w2", "expected"),
    [(1.0, 1.0, [1.1, -0.7]), (2.0, 0.5, [1.45, -0.65]), (1.0, 0.0, [0.6, -0.2]), (0.0, 1.0, [0.5, -0.5])],
)
def test_eq8_weights_global_and_local(w1, w2, expected):
    assert torch.allclose(eq.combine(D_G, D_L, w1, w2), torch.tensor(expected))
    assert torch.allclose(eq.representation(D_G, D_OBJ, w1, w2), torch.tensor(expected))


def test_representation_without_objects_is_global_times_weight_sum():
    assert torch.allclose(eq.representation(D_G, torch.empty(0, 2), 1.0, 1.0), torch.tensor([1.2, -0.4]))


def test_magnitudes_are_l2_norms():
    assert torch.allclose(eq.magnitudes(D_OBJ), torch.tensor([math.sqrt(2), 0.0]))


def test_half_precision_inputs_give_float32_results():
    result = eq.misalignment(I0.half(), T0.half())
    assert result.dtype == torch.float32
    assert torch.allclose(result, D_G, atol=1e-3)
