"""ITEM's misalignment representation (paper Eq. 3-8) as pure functions over tensors.

Always computed in float32, whatever precision the encoders ran in: D is a difference of two unit vectors,
and half precision would spend most of its few digits on the parts that cancel.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Paper Sec. IV: "We empirically set both the weights {w1, w2} of global and local distance to 1.0."
DEFAULT_W1 = 1.0
DEFAULT_W2 = 1.0


def misalignment(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Eq. 3: D = I/|I| - T/|T|, row by row. Shapes (..., d) → (..., d)."""
    image = F.normalize(image_embeddings.float(), dim=-1)
    text = F.normalize(text_embeddings.float(), dim=-1)
    return image - text


def local_misalignment(object_misalignments: torch.Tensor, global_misalignment: torch.Tensor) -> torch.Tensor:
    """Eq. 7: the mean of the per-object distances D_l^i, shape (n, d) → (d,).

    No-object rule (the paper is silent): when nothing was grounded, D_l := D_g, so the image is judged on its
    global misalignment alone instead of on a zero vector the head never saw in training. The same rule runs
    in training and inference, and every result carries its object count.
    """
    if object_misalignments.shape[0] == 0:
        return global_misalignment.float()
    return object_misalignments.float().mean(dim=0)


def combine(
    global_misalignment: torch.Tensor,
    local: torch.Tensor,
    w1: float = DEFAULT_W1,
    w2: float = DEFAULT_W2,
) -> torch.Tensor:
    """Eq. 8: D = w1 * D_g + w2 * D_l."""
    return w1 * global_misalignment.float() + w2 * local.float()


def representation(
    global_misalignment: torch.Tensor,
    object_misalignments: torch.Tensor,
    w1: float = DEFAULT_W1,
    w2: float = DEFAULT_W2,
) -> torch.Tensor:
    """Eq. 7 + 8 for one image: D_g of shape (d,) and the D_l^i of shape (n, d) → D of shape (d,)."""
    local = local_misalignment(object_misalignments, global_misalignment)
    return combine(global_misalignment, local, w1, w2)


def magnitudes(misalignments: torch.Tensor) -> torch.Tensor:
    """|D| per row: how far each object sits from its phrase, the number shown as evidence."""
    return torch.linalg.vector_norm(misalignments.float(), dim=-1)
